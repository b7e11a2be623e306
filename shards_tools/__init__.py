"""Dataset-to-shards tooling for marscale (`marscale-shards`).

The shard format itself (keys, extensions, manifest) belongs to the library,
`marscale.data.shards`; these tools import it, and the library never imports them.

- `annotations`: Kinetics list, VideoMAE CSV, Something-Something v2 JSON, class folders.
- `convert`: the `convert` command: plan, process videos in a pool, write, manifest.
- `plan`: which usable video goes, under which key, into which shard.
- `video`: container truncation checks, probing and re-encoding (PyAV, in memory).
- `write`: checksummed tar shards written atomically, and the resume state.
- `verify`, `stats`: check a shard set against its manifest; describe it.
- `synth`: a synthetic action dataset whose classes differ only in temporal order.
- `synth_motion`: the harder synthetic task (`synth --task motion`): drift directions among
  distractors.
- `cli`: the `marscale-shards` command.
"""
