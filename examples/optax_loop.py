"""A plain JAX / optax training loop whose domain mixture an exported Data Mixing Agent chooses, in-process.

Tiny on purpose: each domain of the agent's domain space is a random Markov chain over V tokens (the domains of
a field share part of their chain), and the model is a bigram softmax LM, logits = W[previous token]. The loop
pre-trains on the source domains (that is the base model), then runs the agent's re-weighting steps: train
`--steps-per-mixture` Adam steps on the agent's mixture, evaluate every domain's held-out loss, tell the agent.

    python examples/optax_loop.py --agent runs/demo/agent/export-cql

`--out FILE` writes the mixtures used and the feedback given (JSON).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dma_jax import Feedback, MixingAgent

V, SEQ, BATCH, HELD_OUT = 32, 33, 32, 64  # vocabulary, tokens per sequence, sequences per batch / held out


def markov_domains(domain_fields: dict[str, str], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each domain's transition matrix [V, V]: half its field's chain, half its own."""
    field_P = {f: rng.dirichlet(np.full(V, 0.2), size=V) for f in sorted(set(domain_fields.values()))}
    return {d: 0.5 * field_P[f] + 0.5 * rng.dirichlet(np.full(V, 0.2), size=V) for d, f in domain_fields.items()}


def sample(P_VxV: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n sequences [n, SEQ] of the chain P."""
    x_NxL = np.empty((n, SEQ), np.int32)
    x_NxL[:, 0] = rng.integers(V, size=n)
    for t in range(1, SEQ):
        cdf_NxV = P_VxV[x_NxL[:, t - 1]].cumsum(-1)
        x_NxL[:, t] = np.minimum((rng.random((n, 1)) > cdf_NxV).sum(-1), V - 1)
    return x_NxL


def loss_fn(W_VxV: jax.Array, x_BxL: jax.Array) -> jax.Array:
    """Mean next-token negative log-likelihood (nats)."""
    logp_BxLxV = jax.nn.log_softmax(W_VxV[x_BxL[:, :-1]])
    return -jnp.take_along_axis(logp_BxLxV, x_BxL[:, 1:, None], axis=-1).mean()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agent", required=True, help="an exported agent folder (`dma export agent`)")
    p.add_argument("--num-steps", type=int, help="re-weighting steps (default: the agent's training horizon)")
    p.add_argument("--steps-per-mixture", type=int, default=50)
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the mixtures and feedback here (JSON)")
    args = p.parse_args()

    agent = MixingAgent.load(args.agent, num_steps=args.num_steps)  # pretrained on its source domains, uniformly
    rng = np.random.default_rng(args.seed)
    chains = markov_domains(agent.domain_fields, rng)
    held_out = {d: jnp.asarray(sample(P, HELD_OUT, rng)) for d, P in chains.items()}

    tx = optax.adam(0.05)
    W = jnp.zeros((V, V))
    opt_state = tx.init(W)

    @jax.jit
    def train_step(W, opt_state, x_BxL):
        loss, g = jax.value_and_grad(loss_fn)(W, x_BxL)
        updates, opt_state = tx.update(g, opt_state)
        return optax.apply_updates(W, updates), opt_state, loss

    eval_loss = jax.jit(loss_fn)

    def train(W, opt_state, mixture: dict[str, float], steps: int):
        for _ in range(steps):
            counts = rng.multinomial(BATCH, [mixture[d] for d in agent.domains])
            x = np.concatenate([sample(chains[d], k, rng) for d, k in zip(agent.domains, counts)])
            W, opt_state, _ = train_step(W, opt_state, jnp.asarray(x))
        return W, opt_state

    def evaluate(W) -> tuple[dict[str, float], dict[str, float]]:
        """Held-out loss per domain, and per field (pooled: equal held-out sets, so the mean)."""
        dom = {d: float(eval_loss(W, x)) for d, x in held_out.items()}
        field = {f: float(np.mean([dom[d] for d in agent.domains if agent.domain_fields[d] == f]))
                 for f in agent.fields}
        return dom, field

    W, opt_state = train(W, opt_state, agent.pretraining_mixture, args.pretrain_steps)
    base_dom, base_field = evaluate(W)  # the base model: the reference the agent's feedback is relative to
    mixtures, feedback = [agent.initial_mixture()], []
    for step in range(agent.num_steps):
        W, opt_state = train(W, opt_state, mixtures[-1], args.steps_per_mixture)
        dom, field = evaluate(W)
        fb = Feedback(domain_losses={d: dom[d] / base_dom[d] for d in dom},
                      field_scores={f: 1.0 + (1.0 - field[f] / base_field[f]) for f in field})
        print(f"step {step}: mixture {', '.join(f'{d} {w:.2f}' for d, w in mixtures[-1].items())}; "
              f"scores {', '.join(f'{f} {s:.3f}' for f, s in fb.field_scores.items())}")
        feedback.append({"domain_losses": fb.domain_losses, "field_scores": fb.field_scores})
        if step + 1 < agent.num_steps:
            mixtures.append(agent.next_mixture(fb))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"domains": list(agent.domains), "mixtures": mixtures, "feedback": feedback}, f, indent=1)


if __name__ == "__main__":
    main()
