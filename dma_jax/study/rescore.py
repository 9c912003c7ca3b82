"""Re-score finished CPT runs on a larger evaluation set: their final models, all benchmark items.

CPT scores its models on `eval.benchmark_items_per_field` items per field (16 in the demo and the study,
to keep the per-step feedback cheap; a stratified subset, `evaluation.select_items`, whose larger subsets
start with the smaller ones). `rescore_runs` loads each run's last checkpoint (the final model) and
evaluates it, and the base target, on up to `items` items per field and `windows` held-out windows
per domain; field and balanced scores are computed exactly as CPT computes them
(`evaluation.normalise`, relative to the base model on the same set). One `rescore-<items>x<windows>.json`
per run, next to its history.json (`path`), so re-running reads it back; each keeps the final model's per-unit raw
metrics and the base's field values (`unit_bootstrap`: the two-level bootstrap of the verdicts). `section` writes
RESULTS.md's 2c from them.
"""

from __future__ import annotations

import numpy as np

from dma_jax import evaluation as ev
from dma_jax import history
from dma_jax import sharding as shd
from dma_jax.checkpoint import Checkpointer
from dma_jax.config import Config
from dma_jax.data.domains import DomainSpace
from dma_jax.errors import DmaError
from dma_jax.io_utils import AnyPath, atomic_write_json, read_json_file, upath
from dma_jax.runs import RunDir
from dma_jax.study import protocol, unit_bootstrap
from dma_jax.study.stats import paired_scores
from dma_jax.study.text import AGENT, cell, paired_line
from dma_jax.train import load_base_params, shared_trainer


def path(run_dir: AnyPath, items: int, windows: int) -> AnyPath:
    """Where `rescore_runs` records the scores of the CPT run in `run_dir` (`RunDir.cpt_run`)."""
    return upath(run_dir) / f"rescore-{items}x{windows}.json"


def done(run_dir: AnyPath, items: int, windows: int) -> bool:
    """Whether the run's rescore doc is there with its per-unit values (older docs lack them: scored again)."""
    file = path(run_dir, items, windows)
    return file.is_file() and "units" in read_json_file(file, "missing")


def rescore_runs(cfg: Config, run_dirs: list[AnyPath], items: int, windows: int,
                 space: DomainSpace | None = None) -> list[dict]:
    """{"policy", "seed", "field_scores" {field: score}, "balanced", "items" {field: n}} per run dir
    (`<cpt dir>/<policy>/seed<k>`), each of a finished CPT run of `cfg`."""
    ec = cfg.eval.model_copy(update={"benchmark_items_per_field": items, "heldout_windows_per_domain": windows})
    out, todo = {}, []
    for d in run_dirs:
        doc = read_json_file(path(d, items, windows), "missing") if path(d, items, windows).is_file() else None
        if doc is not None and "units" in doc:
            out[str(d)] = doc
        else:  # not scored yet, or scored before the per-unit values were kept (for the two-level bootstrap)
            todo.append(d)
    if todo:
        cc = cfg.cpt
        space = space or DomainSpace.for_config(cfg).subset(["source", cc.target_field])
        shape = (cfg.target, cfg.optim, cfg.mesh, cc.num_stages * cc.steps_per_stage, cc.batch_size,
                 space.record_len - 1)
        trainer = shared_trainer(*shape)
        host_set = ev.EvalSet.for_space(space, ec)
        n_items = {f: int(n) for f, n in zip(space.fields, np.asarray(host_set.items_per_field_F))}
        eval_set = shd.put_global(host_set, shd.replicated(trainer.mesh))
        evaluate = ev.shared_evaluate(trainer, ec.batch_size)
        base = shd.put_global(load_base_params(cfg, "target", RunDir(cfg).pretrain_checkpoints("target")),
                              trainer.state_sharding.params)
        base_raw = shd.to_host(evaluate(base, eval_set))
        for d in todo:
            hist = history.load(upath(d) / history.FILE)
            if not hist.complete or list(hist.domain_names) != space.names:
                raise DmaError(f"{d}: not a finished CPT run of this domain space")
            with Checkpointer(upath(d) / "checkpoints", create=False) as ckpt:
                state, _, _ = ckpt.restore(trainer.abstract_state)
            raw = shd.to_host(evaluate(state.params, eval_set))
            norm = ev.normalise(raw, base_raw, ec)
            scores = np.asarray(norm["field_score"], np.float64)
            doc = {"policy": hist.policy, "seed": hist.seed, "fields": list(space.fields),
                   "field_scores": dict(zip(space.fields, scores.tolist())),
                   "balanced": float(ev.balanced_score(np.asarray(norm["field_score"]), ec.balanced)),
                   "items_per_field": items, "heldout_windows_per_domain": windows, "items": n_items,
                   "units": unit_bootstrap.units_doc(raw), "base": unit_bootstrap.base_doc(base_raw)}
            if shd.is_primary():
                atomic_write_json(path(d, items, windows), doc)
            out[str(d)] = doc
    return [out[str(d)] for d in run_dirs]


def test_docs(run: RunDir, items: int, windows: int) -> dict[str, dict[int, dict]] | None:
    """{generic policy: {seed: rescore doc}} of the protocol's test runs (target), or None until every one is
    re-scored with its per-unit values."""
    pairs = protocol.test_pairs(run, run.cfg)
    out: dict[str, dict[int, dict]] = {}
    for p, s in pairs or ():
        file = path(run.cpt_run(p, s), items, windows)
        doc = read_json_file(file, "missing") if file.is_file() else None
        if doc is None or "units" not in doc:
            return None
        out.setdefault(protocol.generic(p), {})[s] = doc
    return out or None


def section(view) -> tuple[list[str], list[str]]:
    """RESULTS.md's 2c (a `results.StudyView`): the final models of the sub-runs that re-score (main, wide-sweep)
    on every benchmark item; (lines, reading lines)."""
    items, windows = view.plan.rescore_items, view.plan.rescore_windows
    if not items:
        return [], []
    ec = view.base.eval
    lines = [f"### 2c. Re-scored on up to {items} benchmark items per field", "",
             f"CPT's scores use {ec.benchmark_items_per_field} items per field (a stratified subset, "
             "`evaluation.select_items`); here "
             f"the same final models (and the base target, = 1) are evaluated on up to {items} items per field and "
             f"{windows} held-out windows per domain (`dma_jax/study/rescore.py`). The agents chose their mixtures "
             "from feedback on the first of these items; the rest they never saw.", ""]
    docs, missing = {}, []
    for sub in (s for s in view.runs if "rescore" in s.stages):
        tag = "" if sub.name == "main" else " (wide)"
        run = view.dirs[sub.name]
        pairs = protocol.compared_pairs(sub, run)
        files = [(p, s, path(run.cpt_run(p, s), items, windows)) for p, s in pairs or ()]
        if not files or not all(f.is_file() for _, _, f in files):
            missing.append(sub.name)  # a sub-run's table appears once all its runs are re-scored
            continue
        docs |= {(protocol.generic(p) + tag, s): read_json_file(f, "missing") for p, s, f in files}
    if missing:
        lines += [f"Not run yet: {', '.join(missing)}.", ""]
    if not docs:
        return lines, []
    fields = [*next(iter(docs.values()))["fields"], "balanced"]
    value = lambda d, f: d["balanced"] if f == "balanced" else d["field_scores"][f]  # noqa: E731
    policies = sorted({p for p, _ in docs}, key=lambda p: -np.mean([d["balanced"] for (q, _), d in docs.items()
                                                                      if q == p]))
    n_items = next(iter(docs.values()))["items"]
    lines += [f"Items per field: {', '.join(f'{f} {n}' for f, n in n_items.items())}.", "",
              "| policy | seeds | " + " | ".join(fields) + " |", "|---|---:|" + "---:|" * len(fields)]
    for p in policies:
        rows = [d for (q, _), d in docs.items() if q == p]
        cells = [np.array([value(d, f) for d in rows]) for f in fields]
        lines.append(f"| {p} | {len(rows)} | " + " | ".join(
            cell(c.mean(), c.std(ddof=1) if c.size > 1 else 0.0, c.size) for c in cells) + " |")
    best = next((p for p in policies if not p.startswith("agent-")), None)
    balanced = {name: {s: d["balanced"] for (q, s), d in docs.items() if q == name} for name in policies}
    reading = []
    for agent in (p for p in policies if p.startswith(AGENT)):
        p = paired_scores(balanced[agent], balanced[best], agent, best) if best else None
        if p is None:
            continue
        lines += ["", f"Paired by seed: {paired_line(p)}"]
        reading.append(f"- Re-scored on all items (2c): {paired_line(p)}")
    return lines + [""], reading
