OK_FORMAT = True

test = {   'name': 'q2',
    'points': 2,
    'suites': [   {   'cases': [   {   'code': '>>> x = torch.randn(3, 16)\n'
                                               '>>> W, A, B = (torch.randn(8, 16), torch.randn(4, 16), torch.zeros(8, 4))\n'
                                               ">>> with grading.own_work('q2', 'llmlab.lora.LoRALinear'):\n"
                                               '...     assert torch.allclose(lora_forward(x, W, A, B, alpha=8), x @ W.T)\n',
                                       'hidden': False,
                                       'locked': False}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
