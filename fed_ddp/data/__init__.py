"""Data: built-in digits, image folders with captions, and partitioning across clients."""
