"""The digits benchmark: data and label rules (`data`), the base model p(x | c) (`model`), its
stages and CTRL problem (`stages`), evaluation (`evaluation`, `plots`) and export (`export`);
`hooks` plugs them into `ctrl_jax.problems.base`."""
