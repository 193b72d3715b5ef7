"""Building blocks of the sequence models: token encoder, relative attention bias, HSTU layer, transformer, losses."""
