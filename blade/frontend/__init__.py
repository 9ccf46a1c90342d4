"""The frontend floor: capture with torch.export, the call signature, dynamic dims."""
