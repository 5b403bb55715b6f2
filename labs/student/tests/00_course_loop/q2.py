OK_FORMAT = True

test = {   'name': 'q2',
    'points': 2,
    'suites': [   {   'cases': [   {   'code': ">>> with grading.own_work('q2', 'llmlab.evaluate.accuracy'):\n...     assert accuracy([{'correct': True}, {'correct': False}]) == 0.5\n",
                                       'hidden': False,
                                       'locked': False}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
