OK_FORMAT = True

test = {   'name': 'q2',
    'points': 1,
    'suites': [   {   'cases': [   {   'code': ">>> with grading.own_work('q2', 'llmlab.reasoning.pass_at_k', 'llmlab.reasoning.mean_pass_at_k'):\n"
                                               '...     assert abs(pass_at_k(8, 2, 1) - 0.25) < 1e-12\n'
                                               '...     assert pass_at_k(8, 6, 4) == 1.0\n'
                                               '...     assert abs(pass_at_k(200, 1, 100) - 0.5) < 1e-09\n',
                                       'hidden': False,
                                       'locked': False}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
