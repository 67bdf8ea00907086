"""Callbacks on the server rank: ``run.callbacks`` names classes (``package.module:Name``, or a name registered
with ``register``), each built once with no arguments. A callback defines any of

    on_round_start(round)                                   before the round's clients are selected
    on_aggregate(round, before, updates, after)             the global adapter before and after aggregation (flat
                                                            fp32 tensors) and the updates it was computed from
                                                            (``strategies.ClientUpdate``: client_id, num_examples,
                                                            delta); ``after`` is ``before`` when nothing was applied
    on_round_end(round, record)                             the round's ``results.RoundRecord``, before it is written
    on_checkpoint(round, path)                              a checkpoint folder was written
    on_finish(summary)                                      the run's ``results.RunSummary``, before summary.json

What ``on_round_start``, ``on_aggregate`` and ``on_round_end`` return (a dict of JSON values, or None) is merged
into the round's record, so metrics.jsonl and W&B carry it with nothing new; a returned name that the round
already reports is refused. A callback that raises stops the run with one line naming it, the event and the
round. Callbacks run on the server rank only, after every check: they see what the server sees.
"""

from __future__ import annotations

from fed_ddp.errors import ConfigError

EVENTS = ("on_round_start", "on_aggregate", "on_round_end", "on_checkpoint", "on_finish")
REGISTRY: dict[str, type] = {}


def register(name: str, cls: type) -> None:
    if name in REGISTRY:
        raise ValueError(f"callback {name!r} is already registered")
    REGISTRY[name] = cls


class CallbackError(RuntimeError):
    """A callback raised: the run stops, its one line names the callback, the event and the round."""


def lookup(spec: str, key: str = "run.callbacks") -> type:
    """The class a ``run.callbacks`` entry names; one line if it is not there or defines no event."""
    if spec in REGISTRY:
        cls = REGISTRY[spec]
    elif ":" in spec:
        from fed_ddp.plugins import resolve

        cls = resolve(spec, key)
    else:
        raise ConfigError(key, spec, f"must be package.module:Name or a registered callback ({sorted(REGISTRY) or 'none'})")
    if not any(callable(getattr(cls, e, None)) for e in EVENTS):
        raise ConfigError(key, spec, f"defines none of {', '.join(EVENTS)}")
    return cls


class Callbacks:
    """The run's callbacks, called in the order ``run.callbacks`` lists them."""

    def __init__(self, specs):
        self.named = []
        for spec in specs or ():
            cls = lookup(str(spec))
            self.named.append((str(spec), cls() if isinstance(cls, type) else cls))

    def __bool__(self) -> bool:
        return bool(self.named)

    def fire(self, event: str, rnd: int, *args, taken=()) -> dict:
        """Call ``event`` on every callback that defines it; the merged dicts they returned. ``taken``: the
        names the round already reports (a callback may not overwrite them)."""
        merged: dict = {}
        for name, cb in self.named:
            fn = getattr(cb, event, None)
            if fn is None:
                continue
            try:
                out = fn(*args) if event == "on_finish" else fn(rnd, *args)
            except Exception as e:
                first = (str(e).strip().splitlines() or [""])[0]
                raise CallbackError(f"run.callbacks: {name}.{event} raised at round {rnd}: "
                                    f"{type(e).__name__}: {first}") from e
            if out is None or event in ("on_checkpoint", "on_finish"):
                continue
            if not isinstance(out, dict):
                raise CallbackError(f"run.callbacks: {name}.{event} returned {type(out).__name__} at round {rnd}: "
                                    "return a dict of JSON values (merged into the round's record) or None")
            clash = sorted((set(out) & set(taken)) | (set(out) & set(merged)))
            if clash:
                raise CallbackError(f"run.callbacks: {name}.{event} returned {clash[0]!r} at round {rnd}, a name the "
                                    "round already reports: choose another")
            merged.update(out)
        return merged
