"""Stage 1, configuration: where inputs are found (`paths`) and the validated parameters of a target (`params`)."""
