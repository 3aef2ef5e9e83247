from prefect import get_run_logger, task

from lora_pipeline.evaluate import run_test

from . import RETRY, cached_on_content, sdk_retries_logged


@task(name="evaluate-adapter", cache_policy=cached_on_content(lambda p: [p["lora_weights"], p["test_prompts"]]),
      persist_result=True, **RETRY)
@sdk_retries_logged
def evaluate_adapter(lora_weights: str, output: str, test_prompts: str | None = None,
                     base_model: str | None = None, compare_base: bool = False,
                     max_tokens: int = 150, temperature: float = 0.7, seed: int = 0,
                     request_timeout: float = 120.0) -> str:
    """Samples LoRA (and base) answers to the test prompts; returns the results file."""
    result = run_test(lora_weights, output, test_prompts, base_model=base_model,
                      compare_base=compare_base, max_tokens=max_tokens, temperature=temperature,
                      seed=seed, request_timeout=request_timeout)
    get_run_logger().info("%d prompts answered by the LoRA%s -> %s", len(result["results"]),
                          " and the base model" if compare_base else "", output)
    return output
