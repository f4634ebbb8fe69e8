"""Data files shipped with selma (tokenizer corpus, benchmark annotations)."""
