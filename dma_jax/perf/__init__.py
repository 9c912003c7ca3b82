"""What the pipeline costs: `dma bench` measures it on this machine, `dma plan` computes the memory per device
of a config on a TPU slice before paying for one.

- `bench`: plans a bench run, checks the goals, prints the tables (`run_bench`, `format_table`);
- `proxies`: the sweep's own compiled stage (`sweep.make_stage`) timed for N proxies, its baselines, its memory;
- `measure`: the timer, the matmul peak, target training, the Grain loader and the agent's decision latency;
- `memory`: the memory plan from abstract shapes (`memory_plan`, `format_memory_plan`).
"""
