"""lm-eval-harness in the loop: `dma eval` scores a model with EleutherAI's lm-evaluation-harness.

- `JaxScorer`: log-likelihoods of (context, continuation) requests on our JAX LM with the in-loop scorer's rows
  (`evaluation._row`: [eos] + context + continuation, each encoded on its own, cut from the left to max_len + 1
  tokens), in fixed-shape padded batches through one jitted function on the default device. A continuation
  longer than max_len tokens (the in-loop scorer skips such items) is scored on its last max_len tokens, warned.
- `harness_lm(scorer)`: the scorer as an `lm_eval.api.model.LM` (`loglikelihood` only).
- `task_config` / `write_tasks(space_dir)`: our benchmark JSONL files ({"context", "choices", "gold"}) as
  lm-eval multiple-choice tasks `dma_<field>`, YAML files under `<data dir>/lm_eval_tasks/`. Our choices carry
  their own leading space or indentation, so `target_delimiter` is "" and a request is exactly
  (context, choice): the pair the in-loop scorer scores.
- `run_eval`: the `dma eval` stage -> lm-eval's results JSON in `<run.out_dir>/eval/<what>.json`.

lm_eval is an optional extra (`pip install -e '.[eval]'`, no torch needed); it is imported on first use, with
the Hugging Face hub and datasets set offline (unless the environment says otherwise) and their caches in a
temporary folder, and it loads only our local task YAMLs (never its built-in task index).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

from dma_jax import evaluation
from dma_jax.config import Config
from dma_jax.data.domains import DomainSpace
from dma_jax.data.tokenizer import Tokenizer, load_tokenizer
from dma_jax.errors import DmaError
from dma_jax.io_utils import AnyPath, atomic_write_text, upath
from dma_jax.models.lm import LMDef, Params
from dma_jax.runs import RunDir
from dma_jax.train import batch_from_tokens, load_base_params, load_cpt_params

TASKS_DIR = "lm_eval_tasks"  # under the prepared data dir
TASK_PREFIX = "dma_"
INSTALL_HINT = "dma eval needs lm-evaluation-harness, an optional extra: pip install -e '.[eval]'"
METRICS = ("acc", "acc_norm")


class HarnessNotSupported(DmaError):
    """A request type outside what `dma eval` is for: it scores log-likelihoods (multiple choice, loglikelihood,
    perplexity); generation tasks (`generate_until`) are refused by design, with a one-line error."""


@functools.cache
def import_lm_eval():
    """The `lm_eval` module, imported offline; a one-line DmaError when the extra is not installed."""
    cache = Path(tempfile.gettempdir()) / f"dma_jax-lm_eval-hf-{os.getuid()}"
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("HF_HOME", str(cache)),
                       ("HF_DATASETS_CACHE", str(cache / "datasets"))):
        os.environ.setdefault(key, value)  # before datasets is imported: it reads them once
    try:
        import lm_eval
        import lm_eval.api.model
        import lm_eval.tasks
        import lm_eval.utils
    except ImportError as e:
        raise DmaError(f"{INSTALL_HINT} ({e})") from e
    return lm_eval


# ---------------------------------------------------------------------------- scoring


def _score_batch(lm: LMDef, params: Params, tokens_BxL1: jax.Array, mask_BxL: jax.Array):
    """(sum of masked target log-probs [B], every masked target is the argmax [B]) - as `evaluation._target_ll`."""
    batch = batch_from_tokens(tokens_BxL1)
    logits_BxLxV = lm.apply(params, batch["inputs"])
    losses_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"])
    greedy_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == batch["targets"]) | (mask_BxL == 0)
    return -(losses_BxL * mask_BxL).sum(axis=-1), greedy_BxL.all(axis=-1)


class JaxScorer:
    """Per-request (log-likelihood, is greedy) of (context, continuation) pairs on one model."""

    def __init__(self, lm: LMDef, params: Params, tokenizer: Tokenizer, max_len: int, batch_size: int):
        if not 1 <= max_len <= lm.cfg.max_seq_len:
            raise DmaError(f"eval: max_len={max_len} must be in 1..model.max_seq_len={lm.cfg.max_seq_len}")
        if batch_size < 1:
            raise DmaError(f"eval: batch_size={batch_size} must be >= 1")
        if tokenizer.vocab_size > lm.cfg.vocab_size:
            raise DmaError(f"eval: the tokenizer's {tokenizer.vocab_size} ids exceed the model's vocab_size="
                           f"{lm.cfg.vocab_size}")
        self.tokenizer, self.max_len, self.batch_size = tokenizer, max_len, batch_size
        self.params = jax.device_put(params, jax.devices()[0])
        self._score = jax.jit(functools.partial(_score_batch, lm))

    def row(self, context: str, continuation: str) -> tuple[list[int], int, bool]:
        """(row ids, number of scored continuation tokens, whether the continuation was cut)."""
        cont_ids = self.tokenizer.encode(continuation)
        if not cont_ids:
            raise DmaError(f"eval: empty continuation after context {context[-40:]!r}")
        if len(cont_ids) <= self.max_len:
            ids, n = evaluation._row(self.tokenizer, context, continuation, self.max_len, "eval")
            return ids, n, False
        ids = [self.tokenizer.eos_id, *self.tokenizer.encode(context), *cont_ids][-(self.max_len + 1):]
        return ids, self.max_len, True

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        rows = [self.row(context, continuation) for context, continuation in pairs]
        n_cut = sum(cut for _, _, cut in rows)
        if n_cut:
            warnings.warn(f"eval: {n_cut} of {len(rows)} continuations are longer than max_len={self.max_len} "
                          "tokens; each is scored on its last max_len tokens", stacklevel=2)
        ll_R, greedy_R = self._score_rows([(ids, n) for ids, n, _ in rows])
        return [(float(ll), bool(g)) for ll, g in zip(ll_R, greedy_R)]

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Each text's whole log-likelihood after [eos]: consecutive windows of max_len scored tokens, each
        conditioned on the max_len tokens before its end (lm-eval's rolling windows, context filled up)."""
        rows, owner = [], []
        for t, text in enumerate(texts):
            full = [self.tokenizer.eos_id, *self.tokenizer.encode(text)]
            for a in range(0, len(full) - 1, self.max_len):
                b = min(a + self.max_len, len(full) - 1)  # targets full[a+1 .. b]
                rows.append((full[max(0, b - self.max_len): b + 1], b - a))
                owner.append(t)
        ll_R, _ = self._score_rows(rows)
        out = np.zeros(len(texts), np.float64)
        np.add.at(out, np.asarray(owner, np.int64), np.asarray(ll_R, np.float64))
        return out.tolist()

    def _score_rows(self, rows: Sequence[tuple[list[int], int]]) -> tuple[np.ndarray, np.ndarray]:
        """Summed log-likelihood and greedy flag of the last n targets of each (ids, n) row, batched."""
        R, B, L1 = len(rows), self.batch_size, self.max_len + 1
        if R == 0:
            return np.zeros((0,), np.float32), np.zeros((0,), bool)
        n_batches = -(-R // B)
        tokens = np.full((n_batches * B, L1), self.tokenizer.pad_id, np.int32)
        mask = np.zeros((n_batches * B, L1 - 1), np.float32)
        for r, (ids, n) in enumerate(rows):
            tokens[r, : len(ids)] = ids
            mask[r, len(ids) - 1 - n: len(ids) - 1] = 1.0
        lls, greedy = [], []
        for b in range(n_batches):
            ll_B, greedy_B = self._score(self.params, tokens[b * B: (b + 1) * B], mask[b * B: (b + 1) * B])
            lls.append(np.asarray(ll_B))
            greedy.append(np.asarray(greedy_B))
        return np.concatenate(lls)[:R], np.concatenate(greedy)[:R]


@functools.cache
def _lm_class():
    base = import_lm_eval().api.model.LM

    class DmaHarnessLM(base):
        """Our JAX LM as an lm-eval model: multiple-choice, log-likelihood and perplexity tasks (no generation)."""

        def __init__(self, scorer: JaxScorer):
            super().__init__()
            self.scorer = scorer

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.scorer.loglikelihood([tuple(r.args[:2]) for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise HarnessNotSupported("eval: generation tasks (generate_until) are not supported: dma eval scores "
                                      "log-likelihoods (multiple-choice, loglikelihood and perplexity tasks)")

    return DmaHarnessLM


def harness_lm(scorer: JaxScorer):
    """`scorer` as an `lm_eval.api.model.LM` instance."""
    return _lm_class()(scorer)


# ---------------------------------------------------------------------------- tasks


def task_config(name: str, data_file: str | Path) -> dict:
    """An lm-eval multiple-choice task over one of our benchmark JSONL files (absolute path)."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).absolute())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": "",  # our choices carry their own leading space / indentation
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in METRICS],
        "metadata": {"version": 1.0},
    }


def write_tasks(space_dir: str | Path) -> Path:
    """`<space_dir>/lm_eval_tasks/dma_<field>.yaml` for every field with benchmarks (rewritten only when they
    differ, e.g. after the data dir moved; stale `dma_*.yaml` removed); returns the folder."""
    space = DomainSpace.load(space_dir)
    out = space.dir / TASKS_DIR
    out.mkdir(parents=True, exist_ok=True)
    want = {}
    for field, info in space.manifest.get("benchmarks", {}).items():
        cfg = task_config(TASK_PREFIX + field, space.dir / info["path"])
        want[out / f"{TASK_PREFIX}{field}.yaml"] = yaml.safe_dump(cfg, sort_keys=False)
    for path in out.glob(f"{TASK_PREFIX}*.yaml"):
        if path not in want:
            path.unlink()
    for path, text in want.items():
        if not path.is_file() or path.read_text() != text:
            atomic_write_text(path, text)
    return out


def _task_manager(cfg: Config, tasks: Sequence[str] | None, include_path: Sequence[str]):
    """(TaskManager over our tasks + `include_path`, the task names to run); unknown names are a DmaError."""
    paths = [str(Path(p).absolute()) for p in include_path]
    for p in paths:
        if not Path(p).is_dir():
            raise DmaError(f"eval: --include-path {p} is not a folder")
    ours = []  # the prepared data's dma_<field> tasks: the default
    if Path(str(RunDir(cfg).data / "manifest.json")).is_file():
        space = DomainSpace.for_config(cfg)  # the data is this config's
        paths.insert(0, str(write_tasks(space.dir)))
        ours = [TASK_PREFIX + f for f in space.manifest.get("benchmarks", {})]
    elif not tasks:
        raise DmaError(f"eval: no prepared data in {cfg.data_dir} (run `dma prepare` first, or name local tasks "
                       "with --tasks and --include-path)")
    tm = import_lm_eval().tasks.TaskManager(include_path=paths or None, include_defaults=False)
    names = list(tasks) if tasks else ours
    unknown = [t for t in names if t not in tm.all_tasks]
    if unknown or not names:
        known = ", ".join(tm.all_tasks) or "none"
        broken = _unreadable_yamls(include_path)
        raise DmaError(f"eval: unknown task {unknown[0] if unknown else '(none found)'} (known: {known}; "
                       "local task YAMLs come from --include-path" + (f"; not valid YAML, so skipped by lm-eval: "
                                                                       f"{broken}" if broken else "") + ")")
    return tm, names


def _unreadable_yamls(folders: Sequence[str]) -> str:
    """The first task YAML under `folders` that does not parse, with its error ('' if all do); lm-eval's own tags
    (`!function`) are accepted."""
    import yaml

    _AnyTag = type("_AnyTag", (yaml.SafeLoader,), {})  # noqa: N806
    _AnyTag.add_multi_constructor("!", lambda loader, suffix, node: None)
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.yaml")):
            try:
                yaml.load(path.read_text(), Loader=_AnyTag)  # noqa: S506 - a SafeLoader subclass
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                return f"{path} ({str(e).splitlines()[0]})"
    return ""


# ---------------------------------------------------------------------------- models


def load_model(cfg: Config, model: str | None = None, policy: str | None = None, seed: int = 0,
               hf_dir: str | None = None) -> tuple[str, LMDef, Params]:
    """(name for the results file, model, params): a base model, a CPT run's final model, or a HF import."""
    if sum(x is not None for x in (model, policy, hf_dir)) > 1:
        raise DmaError("eval: give one of --model, --policy, --hf-dir")
    if hf_dir is not None:
        from dma_jax.models.hf import import_hf

        model_cfg, params = import_hf(hf_dir)
        return f"hf-{Path(hf_dir).absolute().name}", LMDef.build(model_cfg), jax.tree.map(jnp.asarray, params)
    if policy is not None:
        return f"cpt-{policy}-seed{seed}", LMDef.build(cfg.target), load_cpt_params(cfg, policy, seed, RunDir(cfg).cpt_checkpoints(policy, seed))
    which = model or "target"
    if which not in ("proxy", "target"):
        raise DmaError(f"eval: --model {which!r} is not one of proxy, target")
    params = load_base_params(cfg, which, RunDir(cfg).pretrain_checkpoints(which))
    return f"base-{which}", LMDef.build(getattr(cfg, which)), params


# ---------------------------------------------------------------------------- the stage


@contextlib.contextmanager
def _no_bars(off: bool):
    """lm-eval's tqdm bars off while `off` (tqdm reads TQDM_DISABLE only when imported: its default is changed for
    the call and restored)."""
    import tqdm

    init = tqdm.tqdm.__init__
    tqdm.tqdm.__init__ = functools.partialmethod(init, disable=True) if off else init
    try:
        yield
    finally:
        tqdm.tqdm.__init__ = init


def run_eval(cfg: Config, *, model: str | None = None, policy: str | None = None, seed: int = 0,
             hf_dir: str | None = None, tasks: Sequence[str] | None = None, include_path: Sequence[str] = (),
             limit: int | None = None, batch_size: int | None = None, out: str | None = None,
             progress: bool = True) -> tuple[AnyPath, dict]:
    """Score one model on lm-eval tasks (our fields' `dma_<field>` by default); write the results JSON
    (`<run.out_dir>/eval/<what>.json` unless `out`). Returns (its path, lm-eval's results dict)."""
    lm_eval = import_lm_eval()
    if out is not None and "://" not in str(out):  # before the evaluation, not after it
        blocked = next((a for a in Path(out).absolute().parents if a.exists() and not a.is_dir()), None)
        if blocked is not None or Path(out).is_dir():
            raise DmaError(f"eval --out {out}: " + (f"{blocked} is a file, not a folder" if blocked else
                                                     "is a folder; give a file name"))
    if not progress:
        import datasets

        datasets.disable_progress_bars()
    tm, names = _task_manager(cfg, tasks, include_path)
    what, lm, params = load_model(cfg, model, policy, seed, hf_dir)
    tokenizer = load_tokenizer(cfg.data.tokenizer.kind, cfg.data.tokenizer.path)
    scorer = JaxScorer(lm, params, tokenizer, cfg.eval.max_len, batch_size or cfg.eval.batch_size)
    with _no_bars(not progress):
        res = lm_eval.simple_evaluate(model=harness_lm(scorer), tasks=names, task_manager=tm, limit=limit,
                                      log_samples=False, bootstrap_iters=1000)
    if res is None:  # only on a non-primary rank of a multi-process lm-eval run
        raise DmaError("eval: lm-eval returned no results")
    res["dma"] = {"what": what, "max_len": cfg.eval.max_len, "model": lm.cfg.model_dump(mode="json")}
    path = upath(out) if out else RunDir(cfg).eval_results(what)  # local or gs://
    atomic_write_text(path, json.dumps(res, indent=2, default=lm_eval.utils.handle_non_serializable) + "\n")
    return path, res


def format_results(res: dict) -> list[str]:
    """One line per task: acc / acc_norm with their standard errors and the number of items."""
    lines = []
    for task, r in sorted(res.get("results", {}).items()):
        parts = []
        for m in METRICS:
            if f"{m},none" in r:
                stderr = r.get(f"{m}_stderr,none")
                err = f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else ""
                parts.append(f"{m} {r[f'{m},none']:.4f}{err}")
        n = res.get("n-samples", {}).get(task, {}).get("effective")
        lines.append(f"{task}: {', '.join(parts) or 'no acc metrics'}" + (f" (n={n})" if n is not None else ""))
    return lines
