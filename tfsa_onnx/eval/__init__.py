"""Real-model accuracy work: exports of the models the accuracy table uses, and the table script."""
