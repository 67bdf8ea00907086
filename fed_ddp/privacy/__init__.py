"""Privacy you can state: client-level differential privacy with an accountant, and secure aggregation.

- ``dp``: clipping, noise and adaptive clipping (pure functions);
- ``accountant``: epsilon(delta) from ``dp-accounting`` (PLD or RDP), calibration of z;
- ``secagg``: pairwise masking with X25519 / HKDF / ChaCha20 / AES-GCM and Shamir recovery;
- ``config``: the ``privacy`` config group and its cross-group rules;
- ``engine``: what the server and workers do with them each round.
"""
