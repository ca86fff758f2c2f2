"""Scorers: text in, one score per text out. Used to label training data and to judge samples.

Every scorer subclasses `base.Scorer` (name, better, low/high, settings(), cache_key(), score(), misalignment()).
One module per scorer, each importable offline; heavy models load on first use:
  jigsaw_bilstm.JigsawBiLSTM   offline toxicity (Keras BiLSTM weights from toxic-comment-classifier, in torch)
  detoxify_scorer.Detoxify     Detoxify original / unbiased (needs its checkpoint + base-model files offline)
  vader.Vader                  sentiment: VADER compound, or study B's pos - neg rule
  pii.ScrubadubPII             scrubadub detections per character
  pep8.Pycodestyle             pycodestyle violations per character
  profanity.ProfanityCheck     alt-profanity-check, an independent second toxicity judge
`cache.score_with_cache(scorer, texts, ScoreCache(path))` scores each text once per scorer configuration.
"""
