# DeepScaleR-1.5B-Preview's published recipe (GRPO on DeepSeek-R1-Distill-Qwen-1.5B, 8 GPUs):
#   torchrun --nproc_per_node=8 train.py config/deepscaler_1.5b.py --init_from=PATH/DeepSeek-R1-Distill-Qwen-1.5B
# Training set: hf download agentica-org/DeepScaleR-Preview-Dataset --repo-type dataset  (~40K problems)
# Most values are TrainConfig's defaults already; they are spelled out here so the recipe reads in one place.
config.train_data = "data/deepscaler.json"
config.val_data = "data/test/aime.json"      # DeepScaleR validated on AIME 2024
config.out_dir = "out/deepscaler_1.5b"

# context lengthening: 8K with group 8, then 16K and 24K with group 16. At each boundary the reference
# becomes the current weights and the optimizer resets. Step counts approximate the DeepScaleR blog's
# (8K until ~step 1040, 16K for ~500 more, then 24K); check them against your budget.
config.stages = [Stage(steps=1040, max_response_tokens=8192, group_size=8),
                 Stage(steps=500, max_response_tokens=16384, group_size=16),
                 Stage(steps=210, max_response_tokens=24576, group_size=16)]
config.prompts_per_step = 128                  # DeepScaleR's train_batch_size
config.max_prompt_tokens = 1024
config.temperature = 0.6                       # rollout sampling
config.top_p = 1.0
config.top_k = -1

config.mini_batches = 2                        # ppo_mini_batch_size 64 of 128 prompts
config.token_budget = 32768                    # ppo_max_token_len_per_gpu
config.lr = 1e-6
config.weight_decay = 0.01
config.grad_clip = 1.0
config.clip_eps = 0.2
config.kl_coef = 0.001                         # k3 ("low_var_kl")
config.entropy_coef = 0.001
config.loss_agg = "token-mean"                 # over the whole mini-batch and all ranks; DeepScaleR's own
                                               # code averaged per micro-batch: "micro-batch-mean"
config.require_think = True                    # truncated answers are graded like any other (as DeepScaleR did)

config.eval_interval = 10
config.val_n = 8
config.ckpt_interval = 20
config.keep_last = 3

# Newer variants, off in the published recipe:
# config.clip_eps_high = 0.28       # DAPO clip-higher
# config.dynamic_sampling = True    # DAPO: drop all-correct / all-wrong groups, refill from the next prompts
# config.overlong_filter = True     # DAPO: truncated answers get no loss
# config.dr_grpo = True             # Dr. GRPO: no std scaling of advantages, token sums over the budget
