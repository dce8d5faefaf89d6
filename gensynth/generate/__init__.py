"""`gensynth generate RUN_OR_EXPORT OUT`: a trained model -> synthetic shards + manifest.json for other teams.

    gensynth generate runs/gan_fashion data/synth/v1 --num 10000 --seed 0
    gensynth generate runs/gan_fashion s3://bucket/synth/v1 --num 1000000 --shard-size 5000
    accelerate launch --config_file launch/cpu-2proc.yaml -m gensynth generate runs/x OUT --num 100000
    gensynth generate runs/x OUT --num 1000000 --task 3 --tasks 10      # one task of a job array: its shards
    gensynth generate runs/x OUT --num 1000000 --finalize               # then the manifest, once all are in

The plan is a pure function of the arguments: the label of every sample (classes interleaved evenly, so
every shard is balanced like the whole) and the shard boundaries. Shard k's samples are drawn from a
generator seeded by (seed, k) alone, so any shard can be regenerated bit for bit, on any machine of the
same device type, by any worker; shards are dealt round-robin to the workers (processes x array tasks)
with no other coordination.

What a reader can trust: every shard is published whole (temporary name + rename; on S3 an upload on
close), then its receipt (`.receipts/<shard>.json`, a hidden folder that `datasets` skips: sha256, bytes,
class counts and the job's fingerprint). A rerun skips shards whose file matches its receipt and redoes
the rest, so a killed run is finished by running the same command again. The manifest is written last,
atomically, by one writer, after every shard is there and verified: a reader that finds it may trust
every shard it lists; the README.md dataset card follows it.
"""
