"""One way for tests to crash a stage mid-run: `crash_on_call(monkeypatch, owner, "name", n)` makes the n-th call of
`owner.name` (counted from now) raise RuntimeError("simulated crash"); the calls before and after it go through."""


def crash_on_call(monkeypatch, owner, name: str, n: int) -> None:
    real, calls = getattr(owner, name), {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, crashing)
