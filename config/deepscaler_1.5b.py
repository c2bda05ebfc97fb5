# DeepScaleR-1.5B-Preview's published recipe (GRPO on DeepSeek-R1-Distill-Qwen-1.5B, 8 GPUs):
#   torchrun --nproc_per_node=8 train.py config/deepscaler_1.5b.py --init_from=PATH/DeepSeek-R1-Distill-Qwen-1.5B
# Training set: hf download agentica-org/DeepScaleR-Preview-Dataset --repo-type dataset  (~40K problems)
# Most values are TrainConfig's defaults already; they are spelled out here so the recipe reads in one place.
config.train_data = "data/deepscaler.json"
config.val_data = "data/test/aime.json"      # DeepScaleR validated on AIME 2024
config.out_dir = "out/deepscaler_1.5b"

# context lengthening: 8K with group 8, then 16K and 24K with group 16. At each boundary the reference
# becomes the current weights and the optimizer resets. DeepScaleR switched at steps 1040 and 1520 (its
# README) and ran ~1750 steps in all (its blog); check them against your budget. deepscaler_gpus: the GPUs
# each stage ran on (8, then 4 nodes x 8), whose data layout loss_agg="deepscaler" reproduces.
config.stages = [Stage(steps=1040, max_response_tokens=8192, group_size=8, deepscaler_gpus=8),
                 Stage(steps=480, max_response_tokens=16384, group_size=16, deepscaler_gpus=32),
                 Stage(steps=230, max_response_tokens=24576, group_size=16, deepscaler_gpus=32)]
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
config.loss_agg = "deepscaler"                 # DeepScaleR's exact gradient, on any number of GPUs: a token
                                               # mean per verl micro-batch (<= 32,768 tokens on its 8/32 GPUs),
                                               # summed, averaged over those GPUs. "token-mean": one mean over
                                               # the mini-batch, k times smaller (k verl micro-batches per GPU)
config.deepscaler_micro_tokens = 32768         # ppo_max_token_len_per_gpu
config.require_think = True                    # truncated answers are graded like any other (as DeepScaleR did)

config.eval_interval = 10                      # DeepScaleR: every 20 steps at 8K, 10 at 16K/24K, and before training
config.val_n = 8                               # DeepScaleR: 8 at 8K, 16 at 16K/24K
config.ckpt_interval = 20
config.keep_last = 3

# Newer variants, off in the published recipe:
# config.clip_eps_high = 0.28       # DAPO clip-higher
# config.dynamic_sampling = True    # DAPO: drop all-correct / all-wrong groups, refill from the next prompts
# config.overlong_filter = True     # DAPO: truncated answers get no loss
# config.dr_grpo = True             # Dr. GRPO: no std scaling of advantages, token sums over the budget
#                                     (with loss_agg="token-mean": it has its own aggregation)
# Recommended for long runs (DeepScaleR had none): correct for the engine/trainer log-prob gap
# config.tis_c = 2.0                # truncated IS: the policy-gradient term weighted by min(pi_old/pi_rollout, 2)
# config.mis_c = 2.0                # or masked IS: drop tokens whose ratio is outside [1/2, 2] ...
# config.mis_level = "sequence"     # ... or whole answers (their length-normalised ratio)
# config.objective = "gspo"         # GSPO: one clipped ratio per answer; pair with loss_agg="seq-mean-token-mean"
# config.clip_eps, config.clip_eps_high = 3e-4, 4e-4   # and its much narrower sequence-level band (GSPO paper)
# config.objective = "cispo"        # CISPO: clipped IS weight as a constant coefficient, every token keeps a gradient
