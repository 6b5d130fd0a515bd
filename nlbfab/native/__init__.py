"""The native preprocessing engine: a split's tensors straight from the NWB files.

nlb_tools builds them from one data frame holding the whole recording at 1 ms (``NWBDataset``),
resampled by copying it: about 10 GB and minutes for mc_maze. This engine reads what the
tensors are cut from and nothing else, and reproduces nlb_tools 0.0.4's rules so that the
tensors are the same (spike counts exactly, resampled behaviour and PSTHs to float32 rounding):

- ``session``: the NWB files of a dataset folder, read lazily, laid out in time as
  ``NWBDataset`` lays them out (its rows, its NaNs), without its frame;
- ``windows``: which bins of which trials ``NWBDataset.make_trial_data`` cuts;
- ``signals``: the values of those bins, as ``NWBDataset.resample`` (and, for PSTHs, its
  smoothing) would have made them;
- ``tensors``: the split's tensors, step for step as ``nlb_tools.make_tensors`` makes them.
"""
