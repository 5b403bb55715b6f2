OK_FORMAT = True

test = {   'name': 'q1',
    'points': 1,
    'suites': [   {   'cases': [   {   'code': ">>> with grading.own_work('q1', 'llmlab.align.bradley_terry_loss'):\n"
                                               '...     assert abs(bt_loss(torch.zeros(4), torch.zeros(4)).item() - np.log(2)) < 1e-06\n',
                                       'hidden': False,
                                       'locked': False}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
