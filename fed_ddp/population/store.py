"""Per-client state that outlives the rounds a client sits out: on disk, safetensors, written atomically.

    store = ClientStateStore(run_dir / "clients", cache_size=32)
    store.save(client, rnd, {"residual|up.0.lora_A": t, ...}, {"step": "3"})
    tensors, meta = store.load_round(client, 3)        # exactly round 3's state, None if absent
    rnd, tensors, meta = store.load(client, max_round=5)   # the newest at or before round 5

Layout: ``clients/client_NNNNNN/round_RRRR.safetensors`` (tensors + string metadata; safetensors never
unpickles). A client keeps its newest file and the one before it: a run stopped in the middle of round
t resumes from checkpoint t - 1 and must find each client's state as of before round t. The server tells workers which round
each client's state is from (it knows when each client last played), so workers open that exact file
(``load_round``). Any worker may play any client, so the files are the truth; each worker keeps an LRU
cache of at most ``cache_size`` states, used only for the exact round asked.
Disk grows with the clients that ever took part; memory is bounded by the cache.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fed_ddp.files import refuse_link

_FILE = re.compile(r"round_(\d{4,})\.safetensors")


class ClientStateStore:
    def __init__(self, root: str | os.PathLike, cache_size: int = 32):
        self.root = Path(root)
        self.cache_size = max(0, int(cache_size))
        self._cache: OrderedDict[int, tuple[int, dict[str, torch.Tensor], dict[str, str]]] = OrderedDict()
        self.reads = 0  # files read (cache misses), for tests and benchmarks

    def folder(self, client: int) -> Path:
        return self.root / f"client_{client:06d}"

    def rounds(self, client: int) -> list[int]:
        """Rounds for which ``client`` has a complete state file, ascending."""
        folder = self.folder(client)
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _FILE.fullmatch(p.name)))

    def load(self, client: int, max_round: int) -> tuple[int, dict[str, torch.Tensor], dict[str, str]] | None:
        """The newest state of ``client`` saved at a round <= ``max_round`` (copies: callers may mutate)."""
        usable = [r for r in self.rounds(client) if r <= max_round]
        if not usable:
            return None
        got = self.load_round(client, usable[-1])
        return None if got is None else (usable[-1], *got)

    def load_round(self, client: int, rnd: int) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """Exactly the state ``client`` saved at round ``rnd`` (no directory listing), or None if absent."""
        hit = self._cache.get(client)
        if hit is None or hit[0] != rnd:
            path = self.folder(client) / f"round_{rnd:04d}.safetensors"
            if not path.is_file():
                return None
            with safe_open(str(path), framework="pt") as f:
                hit = (rnd, {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {}))  # noqa: SIM118
            self.reads += 1
            self._remember(client, hit)
        else:
            self._cache.move_to_end(client)
        return {k: v.clone() for k, v in hit[1].items()}, dict(hit[2])

    def save(self, client: int, rnd: int, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None,
             keep: int | None = None) -> Path:
        """Write atomically (temporary file, then rename), then drop all but this and the previous file (``keep``:
        the round of the file this state continued from, kept instead: the server may point at it again)."""
        folder = self.folder(client)
        refuse_link(self.root), refuse_link(folder)  # a link planted in the run directory is never followed
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"round_{rnd:04d}.safetensors"
        tmp = folder / f".round_{rnd:04d}.safetensors.tmp"
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {k: str(v) for k, v in (meta or {}).items()}
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, final)
        older = [r for r in self.rounds(client) if r < rnd]
        for r in (older[:-1] if keep is None or keep < 0 else [r for r in older if r != keep]):
            (folder / f"round_{r:04d}.safetensors").unlink(missing_ok=True)
        self._remember(client, (rnd, {k: v.clone() for k, v in tensors.items()}, meta))
        return final

    def _remember(self, client: int, entry) -> None:
        if not self.cache_size:
            return
        self._cache[client] = entry
        self._cache.move_to_end(client)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def clients(self) -> list[int]:
        """Every client with state on disk."""
        if not self.root.is_dir():
            return []
        return sorted(int(p.name.split("_")[1]) for p in self.root.glob("client_*") if p.is_dir())

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*.safetensors")) if self.root.is_dir() else 0
