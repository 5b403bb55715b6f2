OK_FORMAT = True

test = {   'name': 'q1',
    'points': 2,
    'suites': [   {   'cases': [   {   'code': ">>> with grading.own_work('q1', 'llmlab.quant.absmax_quantize', 'llmlab.quant.fake_quantize'):\n"
                                               '...     q, scale = absmax_int8(torch.tensor([0.5, -1.0, 0.25]))\n'
                                               '>>> assert q.dtype == torch.int8 and q.tolist() == [64, -127, 32]\n',
                                       'hidden': False,
                                       'locked': False}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
