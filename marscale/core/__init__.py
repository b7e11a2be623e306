"""The small core every part uses: the config loader, atomic files, the process group, seeds,
choices, stop signals and the clip section."""
