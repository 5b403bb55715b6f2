OK_FORMAT = True

test = {   'name': 'q1',
    'points': 1,
    'suites': [   {   'cases': [   {   'code': ">>> with grading.own_work('q1', 'llmlab.lora.lora_parameters', 'llmlab.lora.projection_shapes'):\n"
                                               '...     assert llama3_lora_params == lora_trainable(llama3_8b, 16)\n'
                                               '>>> assert isinstance(llama3_lora_params, int) and 1000000.0 < llama3_lora_params < 100000000.0\n',
                                       'hidden': False,
                                       'locked': False}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
