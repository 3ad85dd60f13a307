"""lm-eval task folders shipped with linear-moe (YAML + JSONL); pass this folder as --include_path."""
