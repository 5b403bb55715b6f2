OK_FORMAT = True

test = {   'name': 'q3',
    'points': 2,
    'suites': [   {   'cases': [   {   'code': ">>> with grading.own_work('q3', 'llmlab.infer.roofline'):\n"
                                               '...     assert float(roofline_tokens_per_s(1000000000.0, 2, 100, 1)) > 0\n'
                                               '...     assert 0 < float(t4_int4_tokens_per_s) < 1000\n',
                                       'hidden': False,
                                       'locked': False}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
