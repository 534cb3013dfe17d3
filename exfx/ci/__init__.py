"""CI support: deterministic graph text, diffs and golden checks (:mod:`.graphdiff`), and model specs (:mod:`.spec`)."""
