"""The linear_moe_tiny task: a package only so that its utils.py ships in wheels."""
