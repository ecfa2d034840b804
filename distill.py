"""Train the student (MixNet-S, from scratch): alone, with vanilla KD, or with Multi-Part KD.

    python distill.py --multipart                 # Multi-Part KD: teacher epochs 5, 10, ..., 50
    python distill.py --out vanilla.pt            # vanilla KD: the last stored teacher epoch only
    python distill.py --distill-weight 0 --out alone.pt       # the student alone: no teacher file
    python distill.py --anchors 5,15,30,50 --out anchors.pt   # chosen stored epochs, spread evenly
    python distill.py --anchors auto --out auto.pt            # anchors the student chooses itself
    python distill.py --ensemble all --out ensemble.pt        # a snapshot ensemble of the stored epochs

The KD target of every image is the stored teacher logits of exactly the view (plain or mirrored)
the student is trained on, so no teacher runs during distillation. Writes student.pt and
student.log.jsonl; a killed run continues with the same command plus --resume. Where the teacher
logits file holds validation logits, every epoch's log also records the route: the student's KL
divergence from, and top-1 agreement with, every stored teacher epoch on the validation images.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import mpkd

AUTO_THRESHOLD = 0.5  # --auto-threshold's default; how it was chosen: README, "Anchors the student chooses"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),  # the first sentence, whole
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None,
                   help="folder of class folders (unset: in distill.py the folder the teacher logits "
                        "were made from, else Kather 2016's, downloaded if missing)")
    p.add_argument("--teacher-logits", default="teacher_logits.pt",
                   help="the stored teacher logits written by train_teacher.py")
    p.add_argument("--out", default="student.pt", help="student checkpoint")
    p.add_argument("--model", default="mixnet_s", help="timm model name of the student")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False,
                   help="start from ImageNet weights")
    p.add_argument("--multipart", action="store_true",
                   help="follow every stored teacher epoch in turn (else: the last only)")
    p.add_argument("--anchors", default=None,
                   help="comma-separated stored teacher epochs to follow, e.g. 5,15,30,50; or auto: "
                        "the student moves along the stored epochs by the greedy rule of --auto-threshold")
    p.add_argument("--ensemble", default=None, metavar="EPOCHS",
                   help="learn from a snapshot ensemble of stored teacher epochs, a comma list or all: "
                        "the KD target is the mean of their softened distributions, in every epoch")
    p.add_argument("--auto-threshold", type=float, default=AUTO_THRESHOLD,
                   help="--anchors auto: the student is close to a stored epoch when its KL from it is at "
                        "most this times the untrained student's KL from the final teacher; it moves on "
                        "once close to the one it follows, or to a later one it is close to")
    p.add_argument("--temperature", type=float, default=5.0, help="softmax temperature T of the KD term")
    p.add_argument("--distill-weight", type=float, default=0.5,
                   help="w in (1-w)*CE + w*T^2*KL; 0 trains the student alone")
    p.add_argument("--epochs", type=int, default=50, help="training epochs")
    mpkd.add_training_flags(p)
    return p.parse_args(argv)


# Which stored teacher epochs a student follows, and the route it measures on the way.


def parse_epochs(text: str, stored: list[int], flag: str = "--anchors") -> list[int]:
    """'5,15,30,50' -> [5, 15, 30, 50] ('all': every stored epoch), refusing epochs that the teacher
    logits file does not hold; `flag` names the option in messages."""
    if text == "all":
        return sorted(stored)
    try:
        anchors = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise mpkd.UserError(f"{flag} {text!r} must be comma-separated teacher epochs, e.g. 5,15,30,50") from None
    unknown = [a for a in anchors if a not in stored]
    if not anchors or unknown:
        raise mpkd.UserError(f"{flag} {text}: epochs {unknown} are not stored; stored epochs are {sorted(stored)}")
    return anchors


def route(student_logits: torch.Tensor, teacher_val_logits: dict[int, torch.Tensor], temperature: float) -> list[dict]:
    """How far the student is from every stored teacher epoch (the teacher's route, RCO's
    diagnostic): student logits (N, C) and each stored epoch's teacher logits (N, C) on the same
    validation images give KL(soften(teacher, T) || soften(student, T)) as a batch mean (the KD
    term without its T^2 factor) and the top-1 agreement in percent."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    out = []
    for epoch in sorted(teacher_val_logits):
        t = teacher_val_logits[epoch].to(student_logits.device).float()
        kl = F.kl_div(log_s, F.log_softmax(t / temperature, dim=-1), reduction="batchmean", log_target=True)
        agreement = 100 * (t.argmax(1) == student_logits.argmax(1)).float().mean()
        out.append({"teacher_epoch": epoch, "kl": kl.item(), "agreement": agreement.item()})
    return out


def next_auto_anchor(stored: list[int], current: int, distance: dict[int, float], reach: float,
                     threshold: float, epochs_left: int, final_epochs: int) -> int:
    """The stored teacher epoch a student following `current` moves to after an epoch (greedy, in
    the spirit of RCO's anchor search; `--anchors auto`).

    `distance[e]` is KL(teacher@e || student) on the validation images now, and `reach` the route's
    length, the untrained student's KL from the final teacher; "close" means within
    threshold * reach. Once the student is close to the anchor it follows, it has learnt what
    that anchor can teach and moves on to the next stored epoch; it also jumps to any later stored
    epoch it is already close to, taking the latest. It never moves backwards, and moves to the
    final teacher once only `final_epochs` epochs are left (the caller passes ceil(E / K), the
    final teacher's share in the equal-interval schedule), so it always ends on the converged one.
    (Measuring only "the latest epoch within reach" does not work: the KD term holds the student
    near the anchor it follows, so later anchors never come within reach.)
    """
    stored = sorted(stored)
    if epochs_left <= final_epochs:
        return stored[-1]
    close = threshold * reach
    later = [e for e in stored if e > current]
    candidates = [e for e in later if distance[e] <= close]
    if later and distance[current] <= close:  # caught up with the current anchor: on to the next
        candidates.append(later[0])
    return max(candidates, default=current)


def kd_method(distill_weight: float, anchors: list[int], auto: bool = False, ensemble: bool = False) -> str:
    """The METHODS key of a student: alone, vanilla KD (one teacher epoch), Multi-Part KD,
    Multi-Part KD with anchors it chose itself, or a snapshot ensemble of stored epochs."""
    if distill_weight == 0:
        return "alone"
    if ensemble:
        return "ensemble"
    if auto:
        return "auto"
    return "multipart" if len(anchors) > 1 else "vanilla"


def read_teacher(path: str, distill_weight: float) -> dict | None:
    """The teacher logits file, read when the run distils or when it is there: it carries the image
    size and split settings, so a student run need not repeat them. None for a student alone
    without one."""
    if not Path(path).is_file():
        if distill_weight == 0:
            return None
        raise mpkd.UserError(f"{path} does not exist: train_teacher.py writes it (or pass "
                             f"--teacher-logits PATH; --distill-weight 0 trains the student alone)")
    return mpkd.load_file(path, mpkd.LOGITS_FORMAT)


def teacher_epochs(args, teacher):
    """The stored teacher epochs the student learns from: the anchors it follows one at a time (all
    with --multipart or --anchors auto, which chooses among them; those of --anchors; else the
    last), or the members of --ensemble, all at once; [] for the student alone."""
    if args.distill_weight == 0:
        return []
    stored = list(teacher["logits"])
    if args.ensemble:
        clash = next((flag for flag, on in (("--multipart", args.multipart), ("--anchors", args.anchors)) if on), None)
        if clash:
            raise mpkd.UserError(f"--ensemble and {clash} are two methods: give one of them")
        return parse_epochs(args.ensemble, stored, "--ensemble")
    if args.anchors == "auto":
        if "val_logits" not in teacher:  # the teacher stores them wherever the split has a validation part
            raise mpkd.UserError("--anchors auto measures the student against every stored teacher epoch on "
                                 "the validation images: it needs a validation part (--val-frac > 0)")
        return sorted(stored)
    if args.anchors:
        return parse_epochs(args.anchors, stored)
    if args.multipart and len(stored) == 1:
        warn(f"warning: {args.teacher_logits} holds only teacher epoch {stored[0]}: "
             f"--multipart is vanilla KD with this file")
    return sorted(stored) if args.multipart else [max(stored)]


def warn_near_uniform(args, teacher, epochs) -> None:
    """A warning naming the stored epochs whose softened targets are near uniform (a teacher trained
    from scratch, in its first epochs): they teach little, and Multi-Part KD then spends epochs on them."""
    near = {e: u for e in epochs if (u := mpkd.target_uniformity(teacher["logits"][e], args.temperature))
            > mpkd.NEAR_UNIFORM}
    if near and len(near) < len(epochs):
        kept = ",".join(str(e) for e in epochs if e not in near)
        warn(f"warning: at T = {args.temperature:g} the targets of teacher epochs {', '.join(map(str, near))} are "
             f"near uniform (entropy {', '.join(f'{u:.2f}' for u in near.values())} of the maximum): they teach "
             f"little; a teacher trained from scratch? {'--ensemble' if args.ensemble else '--anchors'} {kept} "
             f"leaves them out (docs/own-loop.md)")


def route_logits(teacher, val, device):
    """The teacher's validation logits {stored epoch: (N_val, C)} on `device` for the route, or
    None: no teacher file, or no validation part."""
    if teacher is None or not len(val["labels"]):
        return None
    return {epoch: logits.to(device) for epoch, logits in teacher["val_logits"].items()}


def student_hooks(args, epochs, teacher_val):
    """fit()'s after_epoch: the stored epoch followed, the route, and for --anchors auto the choice
    of the next anchor (kept in the resumable state, so a resumed run chooses the same)."""
    auto = args.anchors == "auto"
    schedule = mpkd.teacher_schedule(args.epochs, epochs) if epochs and not (auto or args.ensemble) else None
    final_epochs = -(-args.epochs // len(epochs)) if epochs else 0  # the final teacher's equal share

    def after_epoch(done, model, extra, val_logits):
        record = {}
        if schedule or auto:  # an ensemble follows all its members in every epoch
            record["teacher_epoch"] = extra["auto"]["current"] if auto else schedule[done - 1]
        if teacher_val is not None:
            record["route"] = route(val_logits, teacher_val, args.temperature)
        if auto and done < args.epochs:
            now = {d["teacher_epoch"]: d["kl"] for d in record["route"]}
            current, reach = extra["auto"]["current"], extra["auto"]["reach"]
            chosen = next_auto_anchor(epochs, current, now, reach, args.auto_threshold,
                                           args.epochs - done, final_epochs)
            if chosen != current:
                why = ("only the final teacher's share of epochs is left" if args.epochs - done <= final_epochs
                       else f"KL from teacher@{current} {now[current]:.4f}, from teacher@{chosen} "
                            f"{now[chosen]:.4f}; close: <= {args.auto_threshold} x {reach:.4f}")
                print(f"auto anchors: after epoch {done} following teacher@{chosen} instead of "
                      f"teacher@{current} ({why})")
                extra["auto"]["current"] = chosen
        return record

    return schedule, after_epoch


def kd_targets(args, teacher, epochs, schedule, n_train, device):
    """fit()'s teacher_logits_for(epoch, extra): the stored logits (N_train, 2, C) of the epoch
    scheduled, or chosen so far by --anchors auto; for --ensemble those of all its members, (N_train,
    2, M, C), in every epoch. None for the student alone."""
    if not epochs:
        return None
    stored = {epoch: teacher["logits"][epoch].to(device) for epoch in epochs}  # (N_train, 2, C) each
    if len(stored[epochs[0]]) != n_train:
        raise mpkd.UserError(f"{args.teacher_logits} holds {len(stored[epochs[0]])} training "
                             f"images, the split has {n_train}")
    if args.ensemble:
        members = torch.stack([stored[epoch] for epoch in epochs], 2)
        return lambda epoch, extra: members
    return lambda epoch, extra: stored[schedule[epoch] if schedule else extra["auto"]["current"]]


def main(args):
    teacher = read_teacher(args.teacher_logits, args.distill_weight)
    data_dir, note = mpkd.resolve_data_folder(args.data, teacher and teacher["args"].get("data"), args.teacher_logits)
    if note:
        print(note)
    settings = mpkd.resolve_data_settings(vars(args), data_dir, teacher and teacher["identity"], args.teacher_logits)
    args = argparse.Namespace(**{**vars(args), "data": data_dir, **settings})
    config = vars(args)
    mpkd.check_settings(config)
    mpkd.check_writable(args.out, mpkd.state_path(args.out), mpkd.log_path(args.out))
    device = mpkd.pick_device(args.device)
    precision = mpkd.pick_precision(device, args.amp)
    data = mpkd.load_dataset(args.data, args.img_size, args.split_by, args.split_seed, args.test_frac, args.val_frac,
                             args.groups, teacher and (teacher["identity"]["classes"], args.teacher_logits))
    state = mpkd.open_state(config, data["identity"])
    epochs = teacher_epochs(args, teacher)
    # the teacher's data, split and classes, or a refusal naming the difference
    if teacher is not None and (differ := mpkd.mismatches(data["identity"], teacher["identity"])):
        raise mpkd.UserError(f"{args.teacher_logits} belongs to other data or settings ({'; '.join(differ)})")
    method = kd_method(args.distill_weight, epochs, args.anchors == "auto", bool(args.ensemble))
    name = mpkd.method_name(method, epochs)
    warn_near_uniform(args, teacher, epochs)
    mpkd.seed_everything(args.seed)  # before decoding: missing --weights stop the run at once
    model = mpkd.to_device(mpkd.build_mixnet(args.model, len(data["classes"]), args.pretrained and state is None,
                                             args.weights if state is None else None), device)
    train, val = mpkd.decode_for_training(data, device, args.batch_size, print, warn)
    teacher_val = route_logits(teacher, val, device)
    schedule, after_epoch = student_hooks(args, epochs, teacher_val)
    teacher_logits_for = kd_targets(args, teacher, epochs, schedule, len(train["labels"]), device)
    start = None
    if args.anchors == "auto" and state is None:  # the route's length: untrained student to final teacher
        untrained = mpkd.predict(model, val["images"], precision)
        reach = route(untrained, {epochs[-1]: teacher_val[epochs[-1]]}, args.temperature)[0]["kl"]
        start = {"auto": {"current": epochs[0], "reach": reach}}
        print(f"auto anchors: starting from teacher@{epochs[0]}; close means a KL of at most "
              f"{args.auto_threshold} x {reach:.4f} (the untrained student's KL from teacher@{epochs[-1]})")
    followed = f"; teacher epoch followed in each student epoch: {schedule}" if schedule else ""
    print(f"{name}: {mpkd.network_name(args.model)} ({args.model}), {mpkd.count_params(model) / 1e6:.2f}M parameters, "
          f"{len(train['labels'])} training images on {device} in {precision}{followed}")
    run = mpkd.fit(model, train, val, config, data["identity"], state, teacher_logits_for=teacher_logits_for,
                   after_epoch=after_epoch, say=print, extra=start)
    checkpoint = mpkd.make_checkpoint(model, config, data, train["images"], method, run["history"])
    if schedule or args.anchors == "auto":  # the stored teacher epoch each student epoch followed
        checkpoint["schedule"] = [r["teacher_epoch"] for r in run["history"]]
    if args.ensemble:
        checkpoint["ensemble"] = epochs
    mpkd.save_atomic(checkpoint, args.out)
    mpkd.state_path(args.out).unlink(missing_ok=True)  # the run is complete: nothing left to resume
    print(f"wrote {args.out} ({name})" + (f"; teacher epochs followed: {checkpoint['schedule']}"
                                           if args.anchors == "auto" else ""))


def warn(line):
    print(line, file=sys.stderr)


if __name__ == "__main__":
    try:
        main(get_args())
    except mpkd.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:  # mpkd.Interrupted says where the last epoch was saved
        print(err or "interrupted before training started", file=sys.stderr)
        sys.exit(130)
