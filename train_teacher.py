"""Train the teacher (MixNet-L, ImageNet-pretrained) and store its logits every few epochs.

    python train_teacher.py --save-every 5

writes teacher.pt (the checkpoint), teacher_logits.pt (the teacher logits: {stored epoch:
(N_train, 2, C) logits of every training image and of its mirror, computed in eval mode at the end
of that epoch}, and the same epochs' logits on the validation images) and teacher.log.jsonl (one
JSON line per epoch). A killed run continues with the same command plus --resume. Defaults are the
paper's protocol.
"""

import argparse
import sys
import time

import mpkd


def get_args(argv=None):
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()),  # the first sentence, whole
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=None,
                   help="folder of class folders (unset: in distill.py the folder the teacher logits "
                        "were made from, else Kather 2016's, downloaded if missing)")
    p.add_argument("--out", default="teacher.pt", help="teacher checkpoint")
    p.add_argument("--logits-out", default="teacher_logits.pt", help="the stored teacher logits on the training set")
    p.add_argument("--model", default="mixnet_l", help="timm model name of the teacher")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from ImageNet weights")
    p.add_argument("--epochs", type=int, default=50, help="training epochs")
    p.add_argument("--save-every", type=int, default=5,
                   help="store the teacher logits every K epochs (and after the last)")
    mpkd.add_training_flags(p)
    return p.parse_args(argv)


def main(args):
    data_dir, _ = mpkd.resolve_data_folder(args.data, None, "")  # unset data flags take the paper's values:
    args = argparse.Namespace(**{**vars(args), "data": data_dir, **mpkd.resolve_data_settings(vars(args), data_dir)})
    config = vars(args)
    mpkd.check_settings(config)
    mpkd.check_writable(args.out, args.logits_out, mpkd.state_path(args.out), mpkd.log_path(args.out))
    device = mpkd.pick_device(args.device)
    precision = mpkd.pick_precision(device, args.amp)
    data = mpkd.load_dataset(args.data, args.img_size, args.split_by, args.split_seed,
                             args.test_frac, args.val_frac, args.groups)
    state = mpkd.open_state(config, data["identity"])  # refuses a stale or foreign state before decoding
    mpkd.seed_everything(args.seed)
    # Built before decoding, so that missing weights stop the run at once; on resume the
    # weights come from the state, so no ImageNet weights are fetched.
    model = mpkd.to_device(mpkd.build_mixnet(args.model, len(data["classes"]), args.pretrained and state is None,
                                             args.weights if state is None else None), device)
    train, val = mpkd.decode_for_training(data, device, args.batch_size, print, warn)
    stored_epochs = set(range(args.save_every, args.epochs + 1, args.save_every)) | {args.epochs}
    if args.save_every > args.epochs:
        warn(f"note: --save-every {args.save_every} is more than --epochs {args.epochs}: the teacher "
             f"logits are stored after the last epoch only, so students can only do vanilla KD")

    def store_logits(epochs_done, model, extra, val_logits):
        if epochs_done not in stored_epochs:
            return {}
        start = time.perf_counter()
        extra.setdefault("logits", {})[epochs_done] = mpkd.both_views_logits(model, train["images"], precision)
        if val_logits is not None:  # the plain view of the validation images: the route diagnostic
            extra.setdefault("val_logits", {})[epochs_done] = val_logits.cpu()
        return {"logits_seconds": time.perf_counter() - start}

    print(f"teacher {args.model}: {mpkd.count_params(model) / 1e6:.2f}M parameters, {len(train['labels'])} training "
          f"images on {device} in {precision}; logits stored after epochs {sorted(stored_epochs)}")
    run = mpkd.fit(model, train, val, config, data["identity"], state, after_epoch=store_logits, say=print)
    teacher_logits = {"format": mpkd.LOGITS_FORMAT, "identity": data["identity"], "teacher": args.model,
                      "logits": run["extra"]["logits"], "args": config,
                      "precision": mpkd.precisions(run["history"])}  # the teacher's, logits included
    if "val_logits" in run["extra"]:  # {stored epoch: (N_val, C)}; absent without a validation part
        teacher_logits["val_logits"] = run["extra"]["val_logits"]
    mpkd.save_atomic(mpkd.make_checkpoint(model, config, data, train["images"], "teacher", run["history"]), args.out)
    mpkd.save_atomic(teacher_logits, args.logits_out)
    mpkd.state_path(args.out).unlink(missing_ok=True)  # the run is complete: nothing left to resume
    print(f"wrote {args.out} and {args.logits_out} (stored epochs {sorted(teacher_logits['logits'])})")


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
