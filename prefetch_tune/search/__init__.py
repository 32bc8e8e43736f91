"""The search: space from the plan, what is asked (settings), Optuna plumbing (studies), winner
rules (selection) and the loop that ties them (tuner)."""
