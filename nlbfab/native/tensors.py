"""A split's tensors from a ``Session``, made as ``nlb_tools.make_tensors`` makes them.

``train_input``, ``eval_input``, ``eval_target``, ``stacked_array``, ``jagged_array`` and ``psth``
follow ``make_train_input_tensors``, ``make_eval_input_tensors``, ``make_eval_target_tensors``,
``make_stacked_array``, ``make_jagged_array`` and ``_make_psth`` (nlb_tools 0.0.4) step for step,
on bins cut by ``windows`` and valued by ``signals`` instead of a resampled data frame. nlb_tools'
``PARAMS`` and its helpers that read only the trial table (``_prep_mask``, ``_prep_jitter``
after ``np.random.seed(seed)`` as there, ``_prep_behavior``, ``_prep_fp``) are called as they are,
so trial selection, jitter and windows are nlb_tools' own.

Where nlb_tools' ``make_trial_data`` is called without ``allow_nans`` (the train input's spikes
and forward spikes, the eval target's held-out and forward spikes), it drops every bin with a
NaN in *any* column of the data, behaviour included: ``Session.complete``. Arrays are float32
(the files hold float32: ``save_to_h5`` writes 32-bit numbers).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from nlb_tools.make_tensors import PARAMS, _prep_behavior, _prep_fp, _prep_jitter, _prep_mask

from nlbfab.errors import UserError
from nlbfab.native.session import SPIKE_FIELDS, Session, SpikeField
from nlbfab.native.signals import resampled, smoothed_counts, spike_counts
from nlbfab.native.windows import Windows, trial_windows


@dataclass(frozen=True)
class Binned:
    """A session seen at one bin width: what nlb_tools' tensor makers take as ``dataset``
    (its helpers read ``trial_info`` and ``bin_width``)."""

    session: Session
    bin_width: int
    trial_info: pd.DataFrame

    def windows(self, ignored_trials, make_params: dict) -> Windows:
        params = {k: v for k, v in make_params.items() if k != "allow_nans"}
        return trial_windows(self.trial_info, ignored_trials, self.bin_width,
                             -(-self.session.n_rows // self.bin_width), **params)

    def kept_bins(self, windows: Windows, make_params: dict) -> np.ndarray:
        """``(sum(windows.bins),)`` bool: the bins ``make_trial_data`` keeps (all with ``allow_nans``)."""
        bins = windows.bin_index()
        return np.ones(len(bins), bool) if make_params.get("allow_nans", False) \
            else self.session.complete.contains(bins * self.bin_width)

    def values(self, field: str, windows: Windows) -> np.ndarray:
        """``(sum(windows.bins), channels)``: the field in every bin of the windows."""
        found = self.session.fields[field]
        if isinstance(found, SpikeField):
            return spike_counts(found, windows, self.bin_width)
        return resampled(found, windows, self.bin_width, self.session.n_rows)


def stacked_array(binned: Binned, fields: list[str], make_params: dict, include_trials) -> dict[str, np.ndarray]:
    """``make_stacked_array``: ``(trials, bins, channels)`` per field; trials of unequal length fail."""
    windows = binned.windows(~include_trials, make_params)
    kept = binned.kept_bins(windows, make_params)
    lengths = np.bincount(np.repeat(np.arange(len(windows.first)), windows.bins)[kept], minlength=len(windows.first))
    if len(set(lengths[lengths > 0])) != 1:
        raise UserError(f"trial windows of unequal length ({sorted(set(lengths[lengths > 0]))} bins without NaN): "
                        f"nlb_tools' make_stacked_array cannot stack them either")
    length = lengths[lengths > 0][0]
    return {f: binned.values(f, windows)[kept].reshape(-1, length, len(binned.session.fields[f].channels))
            for f in fields}


def _placed(data: np.ndarray, jit: int, pad: str, max_len: int) -> tuple[slice, np.ndarray]:
    """Where ``make_jagged_array`` puts a trial's bins in its row of ``max_len``, shifted by
    ``jit`` bins: at the end (``pad='front'``) or the start, cut to fit."""
    if pad == "front":
        data = data[-max_len:] if jit == 0 else data[-(max_len - jit):] if jit > 0 else data[-(max_len - jit):jit]
        return (slice(-(len(data) + jit), -jit) if jit > 0 else slice(-len(data), None)), data
    data = data[jit:max_len + jit] if jit > 0 else data[:max_len - jit]
    return (slice(0, len(data)) if jit > 0 else slice(-jit, len(data) - jit)), data


def jagged_array(binned: Binned, fields: list[str], make_params: dict, include_trials, jitter=None, pad="back",
                 seg_len=None) -> list[dict[str, np.ndarray]]:
    """``make_jagged_array``: per trial selection in ``include_trials`` (one or a list), per
    field, ``(trials, max_len, channels)`` NaN-padded, trials taken by their index in the table."""
    include_trials = include_trials if isinstance(include_trials, list) else [include_trials]
    if jitter is None:
        jitter = [np.zeros(it.sum()) for it in include_trials]
    elif not isinstance(jitter, list):
        jitter = [jitter]
    windows = binned.windows(~np.any(include_trials, axis=0), make_params)
    kept = binned.kept_bins(windows, make_params)
    trial_of_bin = np.repeat(np.arange(len(windows.first)), windows.bins)[kept]
    lengths = np.bincount(trial_of_bin, minlength=len(windows.first))
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    grouped = {t: (s, n) for t, s, n in zip(windows.trial_id, starts, lengths) if n}
    max_len = max(n for _, n in grouped.values()) if seg_len is None else int(round(seg_len / binned.bin_width))
    values = {f: binned.values(f, windows)[kept] for f in fields}
    out = []
    for trial_sel, jitter_vals in zip(include_trials, jitter):
        trial_ixs = binned.trial_info[trial_sel].index.to_numpy()
        missing = [t for t in trial_ixs if t not in grouped]
        if missing:
            raise UserError(f"trial {missing[0]} has no data in its window: "
                            f"nlb_tools' make_jagged_array fails on it too")
        arrays = {}
        for field, rows in values.items():
            arr = np.full((len(trial_ixs), max_len, rows.shape[1]), np.nan, np.float32)
            for i, trial in enumerate(trial_ixs):
                start, n = grouped[trial]
                jit = int(round(jitter_vals[i] / binned.bin_width))
                where, data = _placed(rows[start:start + n], jit, pad, max_len)
                arr[i, where] = data
            arrays[field] = arr
        out.append(arrays)
    return out


def _padded(psth: np.ndarray, max_len: int, pad: str) -> np.ndarray:
    """``_make_psth``'s fit of one condition's PSTH to ``max_len`` bins, NaN-padded. A longer
    front-padded one is cut as nlb_tools cuts it (``psth[max_len:]``, not its last bins)."""
    if psth.shape[0] > max_len:
        return psth[:max_len] if pad == "back" else psth[max_len:]
    filler = np.full((max_len - psth.shape[0], psth.shape[1]), np.nan, np.float32)
    return np.concatenate([psth, filler] if pad == "back" else [filler, psth], axis=0)


def psth(binned: Binned, train_mask, eval_mask, ignore_mask, make_params, cond_fields, kern_sd, pad="back",
         seg_len=None, skip_mask=None):
    """``_make_psth``: per condition, the mean over its trials of their smoothed spikes (all units,
    held-in first) by time from alignment; trials shorter than 0.8 of the condition's mean
    length are left out, and the PSTH is cut to its shortest trial.

    Returns ``((train_cond_idx, eval_cond_idx), psth)``: per condition the indices of its
    trials among the train (eval) trials, and ``psth: (conditions, bins, units)``."""
    trial_info, session = binned.trial_info, binned.session
    skip_mask = skip_mask(trial_info) if skip_mask is not None else np.full(len(trial_info), False)
    combinations = sorted(trial_info[~ignore_mask][cond_fields].dropna().set_index(cond_fields).index.unique().tolist())
    align_field = make_params.get("align_field", "start_time")
    train_trial_ids = trial_info[train_mask][["trial_id", align_field]].dropna().trial_id.to_numpy()
    eval_trial_ids = trial_info[eval_mask][["trial_id", align_field]].dropna().trial_id.to_numpy()
    psth_list, train_ids_list, eval_ids_list = [], [], []
    for comb in combinations:
        mask = np.all(trial_info[cond_fields] == comb, axis=1)
        if not np.any(mask & (~ignore_mask) & (~skip_mask)):
            continue
        windows = binned.windows(~mask | ignore_mask | skip_mask, make_params)
        windows = windows[windows.bins >= 0.8 * np.mean(windows.bins)]
        min_len = windows.bins.min()
        rows = np.concatenate([smoothed_counts(session.fields[f], windows, binned.bin_width, session.n_rows, kern_sd)
                               for f in SPIKE_FIELDS], axis=1)
        align_time = windows.bin_index() * binned.bin_width * 1_000_000 - np.repeat(windows.align, windows.bins)
        order = np.argsort(align_time, kind="stable")
        rows, align_time = rows[order], align_time[order]
        first = np.flatnonzero(np.r_[True, align_time[1:] != align_time[:-1]])  # one group per align_time
        sums = np.add.reduceat(np.nan_to_num(rows).astype(np.float64), first, axis=0)
        counts = np.add.reduceat((~np.isnan(rows)).astype(np.int64), first, axis=0)
        mean = np.divide(sums, counts, out=np.full_like(sums, np.nan), where=counts > 0).astype(np.float32)
        psth_list.append(mean[:min_len] if pad == "back" else mean[-min_len:])
        train_ids_list.append(np.sort(np.where(np.isin(train_trial_ids, windows.trial_id))[0]))
        eval_ids_list.append(np.sort(np.where(np.isin(eval_trial_ids, windows.trial_id))[0]))
    max_len = max(p.shape[0] for p in psth_list) if seg_len is None else int(round(seg_len / binned.bin_width))
    stacked = np.stack([_padded(p, max_len, pad) for p in psth_list])
    return (np.array(train_ids_list, dtype="object"), np.array(eval_ids_list, dtype="object")), stacked


def _jittered(binned: Binned, make_params: dict, trial_mask, jitter, seed: int) -> tuple[Binned, dict, np.ndarray]:
    """The trial table with the jittered alignment field of the masked trials (``go_jitter_time``),
    the make_params that align on it, and the jitter in ms, as the input tensor makers do."""
    np.random.seed(seed)
    jitter_vals = _prep_jitter(binned, trial_mask, jitter)
    align_field = make_params.get("align_field", make_params.get("start_field", "start_time"))
    align_jit = binned.trial_info[trial_mask][align_field] + pd.to_timedelta(jitter_vals, unit="ms")
    align_jit.name = align_field.replace("_time", "_jitter_time")
    make_params = {**make_params, ("align_field" if "align_field" in make_params else "start_field"): align_jit.name}
    return replace(binned, trial_info=pd.concat([binned.trial_info, align_jit], axis=1)), make_params, jitter_vals


def _trial_behavior(trial_info: pd.DataFrame, field) -> np.ndarray:
    """Behaviour from trial fields (dmfc_rsg), times in s."""
    return trial_info[field].apply(lambda x: x.dt.total_seconds() if hasattr(x, "dt") else x).to_numpy().astype("float")


def train_input(binned: Binned, name: str, trial_split, seed: int = 0) -> dict[str, np.ndarray]:
    """``make_train_input_tensors(include_behavior=True, include_forward_pred=True)``."""
    params = PARAMS[name]
    make_params = params["make_params"].copy()
    trial_mask = _prep_mask(binned, trial_split)
    if "jitter" in params:
        binned, make_params, _ = _jittered(binned, make_params, trial_mask, params["jitter"], seed)
    spikes = stacked_array(binned, ["spikes", "heldout_spikes"], make_params, trial_mask)
    data = {"train_spikes_heldin": spikes["spikes"], "train_spikes_heldout": spikes["heldout_spikes"]}
    field = params["behavior_field"]
    if params["behavior_source"] == "data":
        behavior_params = _prep_behavior(binned, params.get("lag", None), make_params)
        behavior = jagged_array(binned, [field], behavior_params, trial_mask)[0][field]
    else:
        behavior = _trial_behavior(binned.trial_info[trial_mask], field)
    if "behavior_mask" in params:
        behavior[~params["behavior_mask"](binned.trial_info[trial_mask])] = np.nan
    data["train_behavior"] = behavior
    fp_params = _prep_fp(make_params, params["fp_len"] / binned.bin_width, binned.bin_width)
    forward = stacked_array(binned, ["spikes", "heldout_spikes"], fp_params, trial_mask)
    data["train_spikes_heldin_forward"] = forward["spikes"]
    data["train_spikes_heldout_forward"] = forward["heldout_spikes"]
    return data


def eval_input(binned: Binned, name: str, trial_split, seed: int = 0) -> dict[str, np.ndarray]:
    """``make_eval_input_tensors``: held-in spikes, and held-out ones unless the trials are test trials."""
    params = PARAMS[name]
    make_params = {**params["make_params"], "allow_nans": True}
    trial_mask = _prep_mask(binned, trial_split)
    if "jitter" in params:
        binned, make_params, _ = _jittered(binned, make_params, trial_mask, params["jitter"], seed)
    if not np.any(binned.trial_info[trial_mask].split == "test"):
        spikes = stacked_array(binned, ["spikes", "heldout_spikes"], make_params, trial_mask)
        return {"eval_spikes_heldin": spikes["spikes"], "eval_spikes_heldout": spikes["heldout_spikes"]}
    return {"eval_spikes_heldin": stacked_array(binned, ["spikes"], make_params, trial_mask)["spikes"]}


def eval_target(binned: Binned, name: str, update_params: dict | None = None, include_psth: bool = False,
                seed: int = 0, train_split="train", eval_split="val") -> dict[str, dict]:
    """``make_eval_target_tensors(train_trial_split, eval_trial_split)``: the eval trials'
    held-out and forward spikes, both splits' behaviour and, where asked, PSTHs."""
    params = {**PARAMS[name], **(update_params or {})}
    make_params = params["eval_make_params"].copy()
    behavior_source, behavior_field = params["behavior_source"], params["behavior_field"]
    jitter = params.get("jitter", None)
    bin_width = binned.bin_width
    suffix = "" if bin_width == 5 else f"_{bin_width}"
    train_mask, eval_mask = _prep_mask(binned, train_split), _prep_mask(binned, eval_split)
    ignore_mask = ~(train_mask | eval_mask)
    if jitter is not None:
        binned, _, train_jitter_vals = _jittered(binned, make_params, train_mask, jitter, seed)
        np.random.seed(seed)
        eval_jitter_vals = _prep_jitter(binned, eval_mask, jitter)
        align_field = make_params.get("align_field", make_params.get("start_field", "start_time"))
        jitter_field = align_field.replace("_time", "_jitter_time")
        trial_info = binned.trial_info.copy()
        trial_info.loc[eval_mask, jitter_field] = (trial_info[eval_mask][align_field]
                                                   + pd.to_timedelta(eval_jitter_vals, unit="ms"))
        binned = replace(binned, trial_info=trial_info)
        make_params["align_field" if "align_field" in make_params else "start_field"] = jitter_field
    else:
        eval_jitter_vals = None
    if "align_range" not in make_params:
        # nlb_tools also makes the train trials' array here, and never uses it
        heldout = jagged_array(binned, [params["hospk_field"]], make_params, eval_mask, jitter=eval_jitter_vals,
                               **params.get("eval_tensor_params", {}))[0]
    else:
        heldout = stacked_array(binned, [params["hospk_field"]], make_params, eval_mask)
    if behavior_source == "trial_info":
        train_behavior = _trial_behavior(binned.trial_info[train_mask], behavior_field)
        eval_behavior = _trial_behavior(binned.trial_info[eval_mask], behavior_field)
    else:
        behavior_params = _prep_behavior(binned, params.get("lag", None), make_params)
        train_behavior = jagged_array(binned, [behavior_field], behavior_params, train_mask)[0][behavior_field]
        eval_behavior = jagged_array(binned, [behavior_field], behavior_params, eval_mask)[0][behavior_field]
    if "behavior_mask" in params:
        train_behavior[~params["behavior_mask"](binned.trial_info[train_mask])] = np.nan
        eval_behavior[~params["behavior_mask"](binned.trial_info[eval_mask])] = np.nan
    fp_params = _prep_fp(make_params, params["fp_len"] / bin_width, bin_width)
    forward = stacked_array(binned, ["spikes", "heldout_spikes"], fp_params, eval_mask)
    group = {
        "eval_spikes_heldout": heldout[params["hospk_field"]],
        "train_behavior": train_behavior,
        "eval_behavior": eval_behavior,
        "eval_spikes_heldin_forward": forward["spikes"],
        "eval_spikes_heldout_forward": forward["heldout_spikes"],
    }
    if "decode_masks" in params:
        group["train_decode_mask"] = params["decode_masks"](binned.trial_info[train_mask])
        group["eval_decode_mask"] = params["decode_masks"](binned.trial_info[eval_mask])
    if include_psth and "psth_params" in params:
        (train_cond_idx, eval_cond_idx), psths = psth(binned, train_mask, eval_mask, ignore_mask,
                                                      **params["psth_params"])
        group.update(eval_cond_idx=eval_cond_idx, train_cond_idx=train_cond_idx, psth=psths)
        if jitter is not None:
            group["eval_jitter"] = (eval_jitter_vals / bin_width).round().astype(int)
            group["train_jitter"] = (train_jitter_vals / bin_width).round().astype(int)
    return {name + suffix: group}


def value_fields(name: str) -> tuple[str, ...]:
    """The behaviour series whose values the dataset's tensors hold (``Session``'s ``keep_values``)."""
    return (PARAMS[name]["behavior_field"],) if PARAMS[name]["behavior_source"] == "data" else ()


def split_tensors(session: Session, split) -> dict[str, dict]:
    """The tensors of one split, as ``nlbfab.prep.split_tensors`` makes them with nlb_tools."""
    binned = Binned(session, split.bin_ms, session.trial_info)
    name = split.dataset.name
    tensors = {"train_input": train_input(binned, name, split.train_splits),
               "eval_input": eval_input(binned, name, split.eval_split)}
    if split.phase == "val":
        tensors["eval_target"] = eval_target(binned, name, include_psth="psth_params" in PARAMS[name])
        if name == "dmfc_rsg":
            tensors["eval_target_train_window"] = eval_target(
                binned, name, update_params={"eval_make_params": PARAMS[name]["make_params"]})
    return tensors
