"""Every batch key flowrl uses, in one place.

Layout of a rollout batch (B samples, P prompt tokens, R response tokens):
prompts are left-padded to P, responses right-padded to R, so that
``cat([prompt_ids, response_ids], dim=1)`` is one [B, P + R] sequence whose
response starts at column P for every row.
"""


class Keys:
    # --- tensors ---------------------------------------------------------------
    PROMPT_IDS = "prompt_ids"  # [B, P] int64, left-padded with the pad id
    PROMPT_MASK = "prompt_mask"  # [B, P] int64, 1 on real prompt tokens
    RESPONSE_IDS = "response_ids"  # [B, R] int64, right-padded with the pad id
    RESPONSE_MASK = "response_mask"  # [B, R] float32, 1 up to and including the first EOS
    TRUNCATED = "truncated"  # [B] bool, the response hit max length without EOS
    ROLLOUT_LOGPROBS = "rollout_logprobs"  # [B, R] float32, log-probs from the sampler (vLLM)
    TOKEN_VERSIONS = "token_versions"  # [B, R] int64, policy version that sampled each token (-1: none; split placement)
    OLD_LOGPROBS = "old_logprobs"  # [B, R] float32, trainer log-probs before the update
    REF_LOGPROBS = "ref_logprobs"  # [B, R] float32, reference-policy log-probs
    TEACHER_LOGPROBS = "teacher_logprobs"  # [B, R] float32, distillation teacher's log-probs of the sampled tokens
    LOGPROBS = "logprobs"  # [B, R] float32, current-policy log-probs (inside the update)
    ENTROPY = "entropy"  # [B, R] float32, per-token entropy of the policy
    VALUES = "values"  # [B, R] float32, critic values V(s_t)
    OLD_VALUES = "old_values"  # [B, R] float32, critic values before the update
    SCORES = "scores"  # [B] float32, sequence-level reward (rule or reward model)
    REWARD_STATUS = "reward_status"  # [B] int64, rule-reward call: 0 ok, 1 error, 2 timeout, 3 invalid
    TOKEN_SCORES = "token_scores"  # [B, R] float32, score placed on the last response token
    TOKEN_REWARDS = "token_rewards"  # [B, R] float32, token scores minus the KL penalty
    ADVANTAGES = "advantages"  # [B, R] float32
    RETURNS = "returns"  # [B, R] float32, value targets
    GROUP_IDS = "group_ids"  # [B] int64, contiguous ids; samples of one prompt share an id
    SAMPLE_SEEDS = "sample_seeds"  # [B] int64, per-prompt sampling seed (rollouts reproducible on resume)
    BASELINE_SCORES = "baseline_scores"  # [B] float32, e.g. ReMax's greedy-rollout score
    CHOSEN_IDS = "chosen_ids"  # [B, L] int64, reward-model pair: preferred sequence, right-padded
    CHOSEN_MASK = "chosen_mask"  # [B, L] int64
    REJECTED_IDS = "rejected_ids"  # [B, L] int64, reward-model pair: other sequence (same L as chosen)
    REJECTED_MASK = "rejected_mask"  # [B, L] int64
    CHOSEN_SCORES = "chosen_scores"  # [B] float32, reward-model score of the chosen sequence
    REJECTED_SCORES = "rejected_scores"  # [B] float32, reward-model score of the rejected sequence
    LOSS_MASK = "loss_mask"  # [B, L] float32, SFT: 1 on tokens the loss counts (next-token targets)
    INPUT_IDS = "input_ids"  # [B, L] int64, SFT: right-padded full sequences
    ATTENTION_MASK = "attention_mask"  # [B, L] int64, SFT: 1 on real tokens
    # multi-turn rollouts (flowrl.workers.agent_loop): RESPONSE_IDS hold the model's turns and the
    # observations between them; RESPONSE_MASK is 1 on the model's tokens only
    OBSERVATION_MASK = "observation_mask"  # [B, R] float32, 1 on inserted observation tokens
    NUM_TURNS = "num_turns"  # [B] int64, model turns of the trajectory
    TOOL_CALLS = "tool_calls"  # [B] int64, tool calls the environment ran
    TOOL_ERRORS = "tool_errors"  # [B] int64, of which failed, timed out or were refused

    # --- per-sample non-tensor fields -----------------------------------------
    MESSAGES = "messages"  # list[dict] chat messages of the prompt
    PROMPT_TEXT = "prompt_text"  # str, the prompt after the chat template
    RESPONSE_TEXT = "response_text"  # str, decoded response
    GROUND_TRUTH = "ground_truth"  # Any, reward_model.ground_truth of the row
    DATA_SOURCE = "data_source"  # str, selects the rule reward
    EXTRA_INFO = "extra_info"  # dict, passed to reward functions
    REWARD_EXTRA = "reward_extra"  # dict, extra values a reward function returned (or {"error": msg})
    FINISH_REASON = "finish_reason"  # str, "stop" or "length" (multi-turn also "max_turns", "step_timeout", "env_error")
    ENV_ERRORS = "env_errors"  # str, multi-turn: why the environment failed ("" if it did not)
    WORKER_TAG = "worker_tag"  # str, which rank produced the row (tests, debugging)
