"""Per-example loss gradients of the selected parameters: which parameters (selection), the blocks a
gradient is made of, the computer (module hooks and autograd, or a model twin's shortcuts), the inputs
of Linear layers, and Adam's preconditioner."""
