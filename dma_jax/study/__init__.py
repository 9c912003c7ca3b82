"""`dma study` (`make study`): a CPU-scale check of the paper's claims (issues 10, 18), written up in RESULTS.md.

  preregistration.json  the `study` section of the config, frozen before the first test-seed run
  main/           (1, 2) pretrain proxy + target, sample + sweep (math); the headroom gate (`dma headroom` on the
                  tuning seeds, its two chosen policies on the test seeds: protocol/gate.json); agents (SFT, CQL)
                  on every seed of `study.agent_seeds`; their critics' Q vs target share (protocol/q_vs_share.*);
                  CPT of the learned baselines and agents on the tuning seeds, then of the compared policies on
                  the test seeds; every compared policy on the proxies (protocol/proxy/); report
  wide-sweep/     (2b) a second sweep whose trajectories drift faster toward the target field
                  (`sweep.sampler.drift_rate_range` of the plan), agents trained on it, and the
                  policies that read a sweep, compared with main's other baselines (the same runs)
  (2c)            main's and wide-sweep's final models re-scored on every benchmark item
                  (rescore-<items>x<windows>.json next to each CPT history)
  gen-code/       (3a) the math-trained agent, unchanged, on the code field (source + code domains)
  gen-domains/    (3b) ... on a space without every second source domain (fewer domains than trained on)
  gen-more-domains/ (3b') ... on a space with every domain cut in two by record range (more domains)
  gen-large/      (3c) ... on a larger target model (pre-trained there)
  cql-alpha-<a>/  (4) CQL retrained from main's SFT actor with penalty weight a
  no-feedback/    (4) SFT + CQL with the feedback features masked (mixture history only)
  cql-chosen/     (2d, follow-up) once main's tuning runs and the alpha ablations are done: CQL with the alpha
                  the tuning seeds choose (frozen in cql-choice.json) on main's test seeds, target and proxies
  cql-chosen-gen-*/ (3, follow-up) each generalisation run again with cql-chosen's agents (`plan.followup_gen`),
                  compared there with that run's baselines and main's agent on the same seeds
  fidelity/       (5) proxies trained along static mixtures and sampled trajectories, and the target
                  CPT'd along the same ones (policy `replay-K`): do their rankings agree?
  RESULTS.md, study.json (wall time per part, summed over invocations; the numerical environment of every
                  invocation), fingerprints.json (digests of every offline dataset and exported agent)

Modules, in the order a study reads: `plan` (the study's knobs, `StudyPlan`; its sub-runs, each declaring
its stages and links), `run` (the runner), `protocol` (the pre-registration, the gate, tuning and test runs),
`fidelity` (part 5's trajectories and section), `followup` (2d: the alpha choice, its proxies and section), `rescore` (2c: the re-scoring and its section), `mixtures` (how
concentrated each policy's mixtures are), `fingerprint` (the environments and digests a reproduction compares), `text` (cells and paired lines), `stats` (ranks, Spearman, t intervals and
tests, bootstraps, Holm, paired differences), `verdicts` (the pre-registered sections of RESULTS.md), `results`
(RESULTS.md from a `StudyView`).
`--quick` runs `plan.QUICK` on the `tiny` variant.
"""

from dma_jax.study.plan import FULL, QUICK, StudyPlan, SubRun, sub_runs
from dma_jax.study.run import STUDY_CONFIG, run_study

__all__ = ["FULL", "QUICK", "STUDY_CONFIG", "StudyPlan", "SubRun", "run_study", "sub_runs"]
