"""Running as one rank of a job that another launcher started (torchrun, or srun on a SLURM
cluster): who started this process and where the ranks meet (``env``), and the rendezvous
store through which the ranks tell each other who failed (``store``)."""
