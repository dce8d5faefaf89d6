"""What every layer shares at run time: stop signals (signals), ranks and their agreement (ranks), the run
directory's layout (layout) and the SLURM record kept in it (record)."""
