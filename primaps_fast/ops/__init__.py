"""One module per stage; each holds the public op, its validation and its backend dispatch."""
