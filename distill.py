"""Train the student (MixNet-S, from scratch): alone, with vanilla KD, or with Multi-Part KD.

    python distill.py --multipart                 # Multi-Part KD: teacher epochs 5, 10, ..., 50
    python distill.py --out vanilla.pt            # vanilla KD: the last stored teacher epoch only
    python distill.py --distill-weight 0 --out alone.pt       # the student alone: no teacher file
    python distill.py --anchors 5,15,30,50 --out anchors.pt   # chosen stored epochs, spread evenly

The KD target of every image is the stored teacher logits of exactly the view (plain or mirrored)
the student is trained on, so no teacher runs during distillation. Writes student.pt and
student.log.jsonl; a killed run continues with the same command plus --resume.
"""

import argparse
import sys
from pathlib import Path

import mpkd


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=mpkd.DEFAULT_DATA,
                   help="folder of class folders (downloaded if it is the default and missing)")
    p.add_argument("--teacher-logits", default="teacher_logits.pt",
                   help="the stored teacher logits written by train_teacher.py")
    p.add_argument("--out", default="student.pt", help="student checkpoint")
    p.add_argument("--model", default="mixnet_s", help="timm model name of the student")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False,
                   help="start from ImageNet weights")
    p.add_argument("--multipart", action="store_true",
                   help="follow every stored teacher epoch in turn (else: the last only)")
    p.add_argument("--anchors", default=None,
                   help="comma-separated stored teacher epochs to follow, e.g. 5,15,30,50")
    p.add_argument("--temperature", type=float, default=5.0, help="softmax temperature T of the KD term")
    p.add_argument("--distill-weight", type=float, default=0.5,
                   help="w in (1-w)*CE + w*T^2*KL; 0 trains the student alone")
    p.add_argument("--epochs", type=int, default=50, help="training epochs")
    # The flags below are the same in train_teacher.py (test_shared_flags_agree_between_the_training_scripts).
    p.add_argument("--img-size", type=int, default=None,
                   help="images are resized to this square size, at least 32 (unset: 112, or in "
                        "distill.py what the teacher logits were made with; likewise the split flags)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="batch size (the paper says 64 and 128; 64 is used)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--step-size", type=int, default=5,
                   help="StepLR: multiply the learning rate by --gamma every this many epochs")
    p.add_argument("--gamma", type=float, default=0.5, help="StepLR factor")
    p.add_argument("--seed", type=int, default=0, help="seed of weights init, shuffling and flips")
    p.add_argument("--split-seed", type=int, default=None,
                   help="seed of the train/val/test split, teacher and students must agree (unset: 0)")
    p.add_argument("--split-by", choices=("tile", "slide", "group"), default=None,
                   help="split tiles at random (paper), by Kather slide id, or by the groups of "
                        "--groups (unset: tile, or group with --groups)")
    p.add_argument("--groups", default=None, metavar="FILE.csv",
                   help="CSV with columns file (relative to --data) and group (slide or patient id) "
                        "for --split-by group")
    p.add_argument("--test-frac", type=float, default=None,
                   help="fraction of every class held out for testing (unset: 0.2)")
    p.add_argument("--val-frac", type=float, default=None,
                   help="fraction of the rest used for validation (unset: 0.2)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="ImageNet weights to start from instead of timm's download: a state dict "
                        "(.pt/.pth/.bin) or .safetensors of the same network, 1000-class head")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast on CUDA (no-op on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its saved state")
    return p.parse_args(argv)


def read_teacher(args):
    """The teacher logits file, read when the run distils or when it is there: it carries the image
    size and split settings, so a student run need not repeat them. None for a student alone
    without one."""
    if args.distill_weight == 0 and not Path(args.teacher_logits).is_file():
        return None
    return mpkd.load_teacher_logits(args.teacher_logits)


def teacher_anchors(args, teacher):
    """The stored epochs to follow: all (--multipart), chosen (--anchors) or the last; [] alone."""
    if args.distill_weight == 0:
        return []
    stored = list(teacher["logits"])
    if args.anchors:
        return mpkd.parse_anchors(args.anchors, stored)
    if args.multipart and len(stored) == 1:
        print(f"warning: {args.teacher_logits} holds only teacher epoch {stored[0]}: "
              f"--multipart is vanilla KD with this file", file=sys.stderr)
    return sorted(stored) if args.multipart else [max(stored)]


def main(args):
    config = vars(args)
    teacher = read_teacher(args)
    mpkd.resolve_data_settings(config, teacher and teacher["identity"], args.teacher_logits)
    mpkd.check_settings(config)
    mpkd.check_writable(args.out, mpkd.state_path(args.out), mpkd.log_path(args.out))
    device = mpkd.pick_device(args.device)
    data = mpkd.load_dataset(args.data, args.img_size, args.split_by, args.split_seed,
                             args.test_frac, args.val_frac, args.groups)
    state = mpkd.open_state(config, data["identity"])
    anchors = teacher_anchors(args, teacher)
    if anchors:  # the same data, split and classes as the teacher's, or a refusal naming the difference
        mpkd.check_same_data(teacher["identity"], data["identity"], args.teacher_logits)
    method = mpkd.kd_method(args.distill_weight, anchors)
    schedule = mpkd.teacher_schedule(args.epochs, anchors) if anchors else None
    mpkd.seed_everything(args.seed)  # before decoding: missing --weights stop the run at once
    model = mpkd.build_mixnet(args.model, len(data["classes"]), args.pretrained and state is None,
                              args.weights if state is None else None)
    model = mpkd.to_device(model, device)
    train, val = mpkd.decode_for_training(data, device, args.batch_size, print, warn)
    if anchors:
        stored = {epoch: teacher["logits"][epoch].to(device) for epoch in anchors}  # (N_train, 2, C) each
        if len(stored[anchors[0]]) != len(train["labels"]):
            raise mpkd.UserError(f"{args.teacher_logits} holds {len(stored[anchors[0]])} training "
                                 f"images, the split has {len(train['labels'])}")
    followed = f"; teacher epoch followed in each student epoch: {schedule}" if schedule else ""
    print(f"{method}: {mpkd.network_name(args.model)} ({args.model}), "
          f"{mpkd.count_params(model) / 1e6:.2f}M parameters, {len(train['labels'])} training images "
          f"on {device}{followed}")
    run = mpkd.fit(model, train, val, config, data["identity"], state,
                   teacher_logits_for=(lambda e: stored[schedule[e]]) if schedule else None,
                   after_epoch=(lambda done, m, extra: {"teacher_epoch": schedule[done - 1]})
                   if schedule else None, say=print)
    checkpoint = mpkd.make_checkpoint(model, config, data["identity"], method, run["history"])
    mpkd.save_atomic(checkpoint, args.out)
    mpkd.state_path(args.out).unlink(missing_ok=True)  # the run is complete: nothing left to resume
    print(f"wrote {args.out} ({method})")


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
