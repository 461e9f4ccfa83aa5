"""Training and evaluation data: dataset layouts (:mod:`.sources`), transforms, torch datasets."""
