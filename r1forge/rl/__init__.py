"""Reinforcement learning for reasoning: GRPO (docs/design.md section 7)."""

from r1forge.rl.grpo_loss import (dynamic_sampling_filter, group_advantages, grpo_loss, per_token_kl,
                                  zero_std_group_fraction)
from r1forge.rl.rewards import (REWARD_FUNCTIONS, REWARD_STATS, CombinedReward, MathChecker, RewardFunction,
                                RewardStats, accuracy_reward, combine_rewards, format_reward, format_reward_soft,
                                get_reward, language_consistency_reward, load_reward, overlong_penalty,
                                register_reward)
