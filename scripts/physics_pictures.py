"""Draw docs/images/xray_models.png: one simulated case of the lumbar CT (L3) from the training simulator and from
the physics test simulator, and the physics simulator with metal in the field; below, what the classic
registration of the metal X-ray found that the CT cannot explain, the X-ray it registered again on, and the found
pixels against the simulator's own metal mask.

    .venv/bin/python scripts/physics_pictures.py [--data ../shared/data] [--out docs/images/xray_models.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from PPCRegistrationLib.drr import DRRRenderer  # noqa: E402
from PPCRegistrationLib.features import extract_surface_points  # noqa: E402
from PPCRegistrationLib.io import read_label_map, read_volume  # noqa: E402
from PPCRegistrationLib.methods import resolve_method  # noqa: E402
from PPCRegistrationLib.metrics import mtre  # noqa: E402
from PPCRegistrationLib.physics_simulation import PhysicsSimulator, PhysicsVariation  # noqa: E402
from PPCRegistrationLib.roi import roi_from_vertebra  # noqa: E402
from PPCRegistrationLib.simulation import ViewSampler, make_case  # noqa: E402


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(root.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(root / "docs" / "images" / "xray_models.png"))
    ap.add_argument("--seed", type=int, default=2)
    args = ap.parse_args()
    d = Path(args.data) / "lumbar_ct"
    ct = read_volume(d / "ct.nii.gz")
    roi = roi_from_vertebra(read_label_map(d / "labels.nii.gz", ct), "L3")
    targets = extract_surface_points(ct, roi, budget=2000).points.detach().to(torch.float64)
    renderer = DRRRenderer(ct)
    case = make_case(renderer, targets, args.seed, (5.0, 10.0), ViewSampler())
    plain = PhysicsSimulator(ct, variation=PhysicsVariation(collimation_p=0.0, log_p=1.0))
    metal = PhysicsSimulator(ct, anchor=targets, metal=True, variation=PhysicsVariation(metal_p=1.0, log_p=1.0,
                                                                                          collimation_p=1.0))
    phys, info = plain.simulate(case.projection, case.T_gt, case.xray_seed)
    with_metal, minfo = metal.simulate(case.projection, case.T_gt, case.xray_seed + 1)
    v = case.view
    reg = resolve_method("classic").registration(ct, with_metal, case.projection, case.T_init, roi,
                                                 T_gt=case.T_gt, renderer=renderer)
    res = reg.run()
    found = reg.foreign_mask if reg.foreign_mask is not None else torch.zeros_like(minfo["metal_mask"])
    grey = np.repeat(with_metal.numpy()[..., None], 3, axis=-1)
    marked = grey.copy()
    marked[found.numpy()] = (1.0, 0.1, 0.1)
    truth = minfo["metal_mask"].numpy()
    versus = np.zeros_like(grey)
    versus[truth & ~found.numpy()] = (0.2, 0.4, 1.0)
    versus[found.numpy() & ~truth] = (1.0, 0.1, 0.1)
    versus[found.numpy() & truth] = (1.0, 1.0, 0.2)
    panels = [(case.xray, "training simulator (--xray-model drr)"),
              (phys, f"physics: {info['kvp']:.0f} kVp, SPR {info['spr']:.2f}, {info['photons']:.0f} photons/px"),
              (with_metal, f"physics + metal ({len(minfo['objects'])} cylinders), collimated"),
              (marked, f"more attenuating than the CT explains (red, {int(found.sum())} px)"),
              (reg.xray.cpu(), f"inpainted; registered again: {case.initial_mtre_mm:.1f} -> "
                               f"{float(mtre(res.T, case.T_gt, targets)):.2f} mm"),
              (versus, "found and metal (yellow), metal only (blue), found only (red)")]
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.6))
    for ax, (img, title) in zip(axes.ravel(), panels):
        img = img.numpy() if isinstance(img, torch.Tensor) else img
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"lumbar CT, L3, the same view (LAO/RAO {v['primary_deg']:.0f}°, CRA/CAU {v['secondary_deg']:.0f}°)",
                 fontsize=10)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
