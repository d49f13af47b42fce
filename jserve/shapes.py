"""The axis letters that end every array name (see STYLE.md).

A `jax.Array` or device-bound numpy array name ends with `_` and one capital
per axis, in order: `q_TNH` is [tokens, query heads, head dim].

    B  requests (sequences) in the batch
    T  tokens in the flattened ragged step
    S  slots within a KV page
    P  pages (of the KV pool, or of one sequence's page table)
    L  layers
    N  query heads
    K  KV heads
    C  combined K/V head slots of the KV pool: 2 * K, key of head k at 2k,
       value at 2k + 1
    G  query heads per KV head (N = K * G)
    H  head dim
    D  model dim
    F  FFN hidden dim
    V  vocab
    Q  query positions of one sequence (a padded per-sequence query block)
    X  positions in a context (keys and values of one sequence)
    E  one past the end: cu_q_lens_E has B + 1 entries
    R  slots of the sampler's per-request state (max_num_seqs rows plus a null row)
    J  entries of a per-request logit-bias table
    W  32-bit words of a token bitmask (ceil(V / 32)); I  the 32 bits of one word
    A  alternatives reported with log-probabilities (the MAX_LOGPROBS most likely tokens)
    M  entries of the sampler's shortlist of candidate tokens
    U  chunks of the vocabulary; Y  tokens in one chunk (V padded = U * Y)
    O  groups of chunks, ranked before their chunks when the shortlist picks the best chunks
    Z  candidate thresholds tried in one pass of the sampler's threshold search
"""
