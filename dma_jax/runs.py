"""The run folder: where every stage writes under `run.out_dir`, and whether it has finished.

This module is the only place that spells a run path. A stage asks `RunDir` for its folder; the
demo, the study and the CLI ask it whether a stage is done (so a second `make demo` rewrites nothing).

    <run.out_dir>/
      pretrain-{proxy,target}/   config.yaml, metrics.jsonl, checkpoints/<step>/      (dma pretrain)
      sweep/                     trajectories.{npz,png}, coverage.{png,md},           (dma sample)
                                 checkpoints/, offline/                               (dma sweep)
      agent/{sft,cql}/           metrics.jsonl, checkpoints/<step>/                   (dma train-agent)
      agent/export-{sft,cql}/    checkpoint/, agent_spec.json
      agent/seed<K>/...          the same for agent seed K > 0 (agent.seeds)  (dma train-agent --agent-seed K)
      cpt/<policy>/seed<k>/      history.json, records.jsonl, checkpoints/            (dma cpt)
      headroom/                  headroom.{md,json}, proxy/seed<k>/ (target runs: cpt/)  (dma headroom)
      protocol/                  gate.json, q_vs_share.{json,png}, proxy/{gate,policies}/seed<k>/  (dma study)
      report/                    report.md, mixtures.png, scores.png                  (dma report)
      export/target-<policy>-seed<k>/  orbax/, hf/                                    (dma export target)
      export/schedules/          <policy>-seed<k>.{json,csv}, agent-<stage>-<file>.*  (dma export schedule)
    <data.dir or run.out_dir/data>/  manifest.json, <domain>/...                      (dma prepare)

Every training stage's folder (pretrain-*, sweep, agent/{sft,cql}, cpt/<policy>/seed<k>) also holds `tb/`, its
TensorBoard event files (`tb_log.tb_dir`, named there: the agent, which writes under its own `out_dir`, cannot
ask RunDir), so `tensorboard --logdir <run.out_dir>` shows every stage as a run.

A policy's folder is its name (`policy_folder`), but for `schedule:FILE`, whose name holds a path. The agent of
agent seed K > 0 is the policy `agent-<stage>@K` (`agent_policy`), its CPT runs in `cpt/agent-<stage>@K/seed<k>/`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterator, Mapping

from dma_jax import history
from dma_jax.config import Config, dump_config
from dma_jax.errors import DmaError
from dma_jax.io_utils import AnyPath, upath

AGENT_STAGES = ("sft", "cql")
AGENT_SPEC_FILE = "agent_spec.json"  # written last by an agent export
OFFLINE_META = "meta.json"  # written last by `offline_data.save`


def latest_step(ckpt_dir: AnyPath) -> int | None:
    """The last committed checkpoint step in `ckpt_dir` (Orbax renames a finished step to its number)."""
    ckpt_dir = upath(ckpt_dir)
    steps = [int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()] if ckpt_dir.is_dir() else []
    return max(steps, default=None)


SCHEDULE_POLICY = "schedule:"  # `schedule:FILE`: replay a schedule file (policies.make_policy)


def policy_folder(policy: str) -> str:
    """The folder (under cpt/, and in export names) of a policy's runs: its name, but for `schedule:FILE`
    `schedule-<file stem>-<first 8 hex digits of the SHA-256 of the file's bytes>`, so the same file gives the same
    folder wherever it lies and an edited file a new one. The CPT history records this name as the policy."""
    if not policy.startswith(SCHEDULE_POLICY):
        return policy
    path = upath(policy.removeprefix(SCHEDULE_POLICY))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DmaError(f"policy '{policy}': cannot read the schedule file ({e.strerror or e})") from None
    return f"schedule-{_safe_stem(path)}-{hashlib.sha256(data).hexdigest()[:8]}"


def _safe_stem(path: AnyPath) -> str:
    """A file's stem as a folder-name part: letters, digits, '.', '_', '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("._")[:64] or "file"


AGENT_POLICY = re.compile(rf"agent-({'|'.join(AGENT_STAGES)})(?:@(.*))?")


def agent_policy(name: str) -> tuple[str, int] | None:
    """(stage, agent seed) of a trained agent's policy name (`agent-cql`: seed 0, `agent-cql@K`: seed K > 0), None for
    another name; `agent-<stage>@` with anything but a seed > 0 without leading zeros is a one-line DmaError."""
    m = AGENT_POLICY.fullmatch(name)
    if m is None:
        return None
    stage, text = m.groups()
    if text is None:
        return stage, 0
    if not text.isdigit() or str(int(text)) != text or int(text) == 0:
        plain = f" (agent seed 0 is the plain name agent-{stage})" if text.isdigit() and int(text) == 0 else ""
        raise DmaError(f"policy '{name}': write agent-{stage}@K, K an agent seed > 0 without leading zeros{plain}")
    return stage, int(text)


def agent_policy_name(stage: str, agent_seed: int) -> str:
    return f"agent-{stage}" if agent_seed == 0 else f"agent-{stage}@{agent_seed}"


def _read_json(path: AnyPath) -> dict:
    try:
        return json.loads(upath(path).read_text())
    except (OSError, ValueError):
        return {}


@dataclasses.dataclass(frozen=True)
class RunDir:
    """Every stage's folder for one config, and each stage's is-done check."""

    cfg: Config

    @property
    def root(self) -> AnyPath:
        return upath(self.cfg.run.out_dir)

    # ------------------------------------------------------------------------------------ paths
    @property
    def data(self) -> AnyPath:
        return upath(self.cfg.data_dir)

    def pretrain(self, which: str) -> AnyPath:
        return self.root / f"pretrain-{which}"

    def pretrain_checkpoints(self, which: str) -> AnyPath:
        return self.pretrain(which) / "checkpoints"

    @property
    def sweep(self) -> AnyPath:
        return self.root / "sweep"

    @property
    def trajectories(self) -> AnyPath:
        return self.sweep / "trajectories.npz"

    @property
    def coverage_plot(self) -> AnyPath:
        return self.sweep / "coverage.png"

    @property
    def coverage_table(self) -> AnyPath:
        return self.sweep / "coverage.md"

    @property
    def sweep_checkpoints(self) -> AnyPath:
        return self.sweep / "checkpoints"

    @property
    def offline(self) -> AnyPath:
        return self.sweep / "offline"

    @property
    def agent(self) -> AnyPath:
        return self.root / "agent"

    def agent_dir(self, agent_seed: int = 0) -> AnyPath:
        """Where `dma train-agent` trains agent seed K: `agent/` for 0 (as before there were seeds), else
        `agent/seed<K>/`."""
        return self.agent if agent_seed == 0 else self.agent / f"seed{agent_seed}"

    def agent_stage(self, stage: str, agent_seed: int = 0) -> AnyPath:
        return self.agent_dir(agent_seed) / stage

    def agent_export(self, stage: str, agent_seed: int = 0) -> AnyPath:
        return self.agent_dir(agent_seed) / f"export-{stage}"

    def agent_exports(self) -> AgentExports:
        """{policy name: export folder} of the agents CPT can load, any agent seed's (`AgentExports`)."""
        return AgentExports(self)

    @property
    def cpt(self) -> AnyPath:
        return self.root / "cpt"

    def cpt_run(self, policy: str, seed: int) -> AnyPath:
        return self.cpt / policy_folder(policy) / f"seed{seed}"

    def cpt_checkpoints(self, policy: str, seed: int) -> AnyPath:
        return self.cpt_run(policy, seed) / "checkpoints"

    @property
    def headroom(self) -> AnyPath:
        return self.root / "headroom"

    @property
    def headroom_table(self) -> AnyPath:
        return self.headroom / "headroom.md"

    @property
    def headroom_json(self) -> AnyPath:
        return self.headroom / "headroom.json"

    @property
    def headroom_plot(self) -> AnyPath:
        return self.headroom / "response.png"

    def headroom_proxy(self, seed: int) -> AnyPath:
        """The proxy-side headroom runs of one seed: result.json (written last), checkpoints/ while running."""
        return self.headroom / "proxy" / f"seed{seed}"

    def headroom_proxy_checkpoints(self, seed: int) -> AnyPath:
        return self.headroom_proxy(seed) / "checkpoints"

    @property
    def protocol(self) -> AnyPath:
        """The study's protocol outputs in its main run (`study.protocol`)."""
        return self.root / "protocol"

    @property
    def protocol_gate(self) -> AnyPath:
        return self.protocol / "gate.json"

    @property
    def protocol_probe(self) -> AnyPath:
        """The critics' Q against the target share, per agent seed (`agent.probe`): q_vs_share.json and .png."""
        return self.protocol / "q_vs_share.json"

    def protocol_proxy(self, kind: str, seed: int) -> AnyPath:
        """One proxy seed of the study: `gate` (the gate's two open-loop policies) or `policies` (every compared
        policy, closed loop): result.json (written last), checkpoints/ while running."""
        return self.protocol / "proxy" / kind / f"seed{seed}"

    @property
    def report(self) -> AnyPath:
        return self.root / "report"

    def export_target(self, policy: str, seed: int) -> AnyPath:
        return self.root / "export" / f"target-{policy_folder(policy)}-seed{seed}"

    def schedule_files(self, name: str, out: str | None = None) -> tuple[AnyPath, AnyPath]:
        """`dma export schedule`'s JSON and CSV files `<name>.{json,csv}`, in `out` or `<run.out_dir>/export/schedules`;
        `name`: `schedule_name` of a CPT run, or `agent-<stage>-<feedback file stem>` for an agent's rollout."""
        folder = upath(out) if out else self.root / "export" / "schedules"
        return folder / f"{name}.json", folder / f"{name}.csv"

    @staticmethod
    def schedule_name(policy: str, seed: int) -> str:
        return f"{policy_folder(policy)}-seed{seed}"

    @staticmethod
    def rollout_name(stage: str, feedback_file: str) -> str:
        return f"agent-{stage}-{_safe_stem(upath(feedback_file))}"

    def eval_results(self, what: str) -> AnyPath:
        """`dma eval`'s lm-eval results JSON for one model (base-<which>, cpt-<policy>-seed<k>, hf-<dir name>)."""
        return self.root / "eval" / f"{what}.json"

    def bench_json(self, quick: bool) -> AnyPath:
        return self.root / ("bench-quick.json" if quick else "bench.json")

    # ------------------------------------------------------------------------------------ is done
    def prepared(self) -> bool:
        """The manifest (written last) exists and was written with this `data` config."""
        return _read_json(self.data / "manifest.json").get("config") == dump_config(self.cfg)["data"]

    def pretrained(self, which: str) -> bool:
        return latest_step(self.pretrain_checkpoints(which)) == self.cfg.pretrain.steps_for(which)

    def sampled(self) -> bool:
        return self.trajectories.is_file()

    def swept(self) -> bool:
        return (self.offline / OFFLINE_META).is_file()

    def agent_trained(self, stage: str, agent_seed: int = 0) -> bool:
        steps = (self.cfg.agent.sft if stage == "sft" else self.cfg.agent.cql).steps
        return latest_step(self.agent_stage(stage, agent_seed) / "checkpoints") == steps

    def agent_exported(self, stage: str, agent_seed: int = 0) -> bool:
        """The export's spec (written last) names the final step of the stage's training."""
        steps = (self.cfg.agent.sft if stage == "sft" else self.cfg.agent.cql).steps
        return _read_json(self.agent_export(stage, agent_seed) / AGENT_SPEC_FILE).get("step") == steps

    def cpt_done(self, policy: str, seed: int) -> bool:
        return history.is_finished(self.cpt_run(policy, seed), dump_config(self.cfg)["cpt"])

    def report_fresh(self) -> bool:
        """report.md exists and is newer than every CPT history."""
        md = self.report / "report.md"
        hists = list(self.cpt.glob(f"*/seed*/{history.FILE}")) if self.cpt.is_dir() else []
        return md.is_file() and all(h.stat().st_mtime <= md.stat().st_mtime for h in hists)


class AgentExports(Mapping):
    """{policy name: export folder}: `agent-<stage>` (agent seed 0) and `agent-<stage>@K` map to
    `RunDir.agent_export(stage, K)` for any K, exported or not (the policy says which is missing); iterating lists the
    names of `agent.seeds` (and seed 0)."""

    def __init__(self, run: RunDir):
        self.run = run

    def __getitem__(self, name: str) -> AnyPath:
        parsed = agent_policy(name) if isinstance(name, str) else None
        if parsed is None:
            raise KeyError(name)
        return self.run.agent_export(*parsed)

    def __iter__(self) -> Iterator[str]:
        seeds = sorted({0, *self.run.cfg.agent.seeds})
        return iter([agent_policy_name(stage, k) for k in seeds for stage in AGENT_STAGES])

    def __len__(self) -> int:
        return len(list(iter(self)))
