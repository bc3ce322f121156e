"""Commands a launch runs instead of stages (`stage=check`, `stage=status`): they read the
config or the resolved plan and write nothing."""
