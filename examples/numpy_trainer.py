"""A trainer without JAX (standing in for PyTorch / Megatron) whose domain mixture an exported agent chooses.

The trainer never imports JAX (checked at the end). The agent runs in a child process, `python -m dma_jax.api
serve` (the protocol: `dma_jax/api.py`'s module doc), that reads one JSON request per line on its stdin and
answers one JSON line on its stdout. The trainer has its own domains (five Markov chains over V tokens, three of
the source field, two of the target field) and model (a bigram softmax LM trained by SGD, gradients by hand).

    python examples/numpy_trainer.py --agent runs/demo/agent/export-cql [--target-field math]

`--out FILE` writes the mixtures used and the feedback given (JSON); `--python` runs the agent process with
another interpreter (one with dma_jax installed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np

V, SEQ, BATCH, HELD_OUT, LR = 32, 33, 32, 64, 2.0
SOURCE = ("web", "books", "wiki")
TARGET = ("proofs", "arithmetic")


class AgentProcess:
    """The agent in a child process: `ask(request)` writes one JSON line and reads the answer's."""

    def __init__(self, cmd: list[str]):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # stderr: ours
        self.info = self._read()  # domains, fields, target field, num_steps

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the agent process ended (exit status {self.proc.wait()}); its errors are above")
        msg = json.loads(line)
        if "error" in msg:
            raise SystemExit(f"agent: {msg['error']}")
        return msg

    def ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()  # end of input: the agent process exits
        self.proc.wait(timeout=60)


def sample(P_VxV: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n sequences [n, SEQ] of the Markov chain P."""
    x_NxL = np.empty((n, SEQ), np.int64)
    x_NxL[:, 0] = rng.integers(V, size=n)
    for t in range(1, SEQ):
        cdf_NxV = P_VxV[x_NxL[:, t - 1]].cumsum(-1)
        x_NxL[:, t] = np.minimum((rng.random((n, 1)) > cdf_NxV).sum(-1), V - 1)
    return x_NxL


def loss_and_grad(W_VxV: np.ndarray, x_NxL: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean next-token NLL of the bigram LM and its gradient: d/dlogits = softmax - onehot."""
    prev_K, nxt_K = x_NxL[:, :-1].ravel(), x_NxL[:, 1:].ravel()
    logits_KxV = W_VxV[prev_K]
    logits_KxV = logits_KxV - logits_KxV.max(-1, keepdims=True)
    p_KxV = np.exp(logits_KxV)
    p_KxV /= p_KxV.sum(-1, keepdims=True)
    loss = -np.log(p_KxV[np.arange(len(nxt_K)), nxt_K]).mean()
    p_KxV[np.arange(len(nxt_K)), nxt_K] -= 1.0
    g_VxV = np.zeros_like(W_VxV)
    np.add.at(g_VxV, prev_K, p_KxV / len(nxt_K))
    return float(loss), g_VxV


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agent", required=True, help="an exported agent folder (`dma export agent`)")
    p.add_argument("--target-field", default="math", help="the field the agent was trained to gain")
    p.add_argument("--num-steps", type=int, help="re-weighting steps (default: the agent's training horizon)")
    p.add_argument("--steps-per-mixture", type=int, default=50)
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--out", help="write the mixtures and feedback here (JSON)")
    args = p.parse_args()

    field_of = {**{d: "source" for d in SOURCE}, **{d: args.target_field for d in TARGET}}
    pretraining = {d: 1.0 if d in SOURCE else 0.0 for d in field_of}  # the base model: source domains, uniformly
    cmd = [args.python, "-m", "dma_jax.api", "serve", "--agent", args.agent, "--domains", json.dumps(field_of),
           "--target-field", args.target_field, "--pretraining-mixture", json.dumps(pretraining)]
    if args.num_steps is not None:
        cmd += ["--num-steps", str(args.num_steps)]
    agent = AgentProcess(cmd)
    num_steps, fields = agent.info["num_steps"], agent.info["fields"]

    rng = np.random.default_rng(args.seed)
    field_P = {f: rng.dirichlet(np.full(V, 0.2), size=V) for f in fields}
    chains = {d: 0.5 * field_P[f] + 0.5 * rng.dirichlet(np.full(V, 0.2), size=V) for d, f in field_of.items()}
    held_out = {d: sample(P, HELD_OUT, rng) for d, P in chains.items()}
    W = np.zeros((V, V))

    def train(W, mixture: dict[str, float], steps: int) -> np.ndarray:
        for _ in range(steps):
            counts = rng.multinomial(BATCH, [mixture[d] for d in field_of])
            x = np.concatenate([sample(chains[d], k, rng) for d, k in zip(field_of, counts)])
            W = W - LR * loss_and_grad(W, x)[1]
        return W

    def evaluate(W) -> tuple[dict[str, float], dict[str, float]]:
        dom = {d: loss_and_grad(W, x)[0] for d, x in held_out.items()}
        return dom, {f: float(np.mean([dom[d] for d in field_of if field_of[d] == f])) for f in fields}

    W = train(W, {d: w / sum(pretraining.values()) for d, w in pretraining.items()}, args.pretrain_steps)
    base_dom, base_field = evaluate(W)
    mixtures, feedback = [agent.ask({"op": "initial"})["mixture"]], []
    for step in range(num_steps):
        W = train(W, mixtures[-1], args.steps_per_mixture)
        dom, field = evaluate(W)
        fb = {"domain_losses": {d: dom[d] / base_dom[d] for d in dom},
              "field_scores": {f: 1.0 + (1.0 - field[f] / base_field[f]) for f in field}}
        print(f"step {step}: mixture {', '.join(f'{d} {w:.2f}' for d, w in mixtures[-1].items())}; "
              f"scores {', '.join(f'{f} {s:.3f}' for f, s in fb['field_scores'].items())}")
        feedback.append(fb)
        if step + 1 < num_steps:
            mixtures.append(agent.ask({"op": "next", **fb})["mixture"])
    agent.close()
    assert "jax" not in sys.modules, "the trainer imported JAX"
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"domains": list(field_of), "domain_fields": field_of, "mixtures": mixtures, "feedback": feedback,
                       "jax_imported": "jax" in sys.modules}, f, indent=1)


if __name__ == "__main__":
    main()
