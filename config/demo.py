# The CPU demo: a ~0.5M-parameter Qwen2 learns 2-digit addition by GRPO (minutes on 2 cores).
#   python train.py config/demo.py
# demo.py builds the tokenizer, the data and a supervised warm-start checkpoint (once), then this is the
# ordinary GRPO loop. The warm-start length was chosen by measurement (see README's CPU demo section).
config.prepare = "demo:prepare"
config.out_dir = "out/demo"
config.instruction = ""             # prompts are just "<bos><User>23+45<Assistant>"
config.stages = [Stage(steps=500, max_response_tokens=24, group_size=8)]
config.prompts_per_step = 16
config.mini_batches = 2
config.temperature = 1.0
config.lr = 1e-4
config.kl_coef = 0.0                # nothing to stay close to: the warm-start is not a model worth keeping
config.entropy_coef = 0.0
config.token_budget = 4096
config.gradient_checkpointing = False
config.ckpt_interval = 100
config.eval_interval = 0
config.grader_workers = 1           # tiny answers: the grader's inline fast path settles them
config.engine_memory = 8 * 2**20    # KV pool bytes: plenty for 128 x 40 tokens of a tiny model
config.threads = 1                  # tiny matrices: one thread wastes no time on synchronisation
