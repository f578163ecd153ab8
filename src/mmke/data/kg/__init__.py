"""Knowledge-graph mechanisms that turn facts into edit cases: counterfactual targets, multi-hop
questions and adversarial prompts.

Both the generated world (``mmke.data.world``) and the construction pipeline
(``mmke.data.build``) use them, so they import neither.
"""
