"""A model script that exits 0 without printing a frames_path line."""

print("progress: 50", flush=True)
print("progress: 100", flush=True)
print("done, I think", flush=True)
